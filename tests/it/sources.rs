//! Local sources other than the sample region's CSV files.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use fedgate::config::raw::RawMemberConfig;

use crate::support::{Region, column_strings};

/// Writes Anji's census as a typed Parquet file of these rows (code, name, total,
/// share over 65).
fn write_census_parquet(file: &std::path::Path, rows: &[(&str, &str, i64, Option<f64>)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("dm", DataType::Utf8, false),
        Field::new("mc", DataType::Utf8, false),
        Field::new("rk", DataType::Int64, false),
        Field::new("lnzb", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    // Written beside and renamed over, as a city's export job would replace it.
    let tmp = file.with_extension("parquet.tmp");
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&tmp).unwrap(),
        schema,
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Points Anji's census source at `data/anji/census.parquet` (the file has no columns
/// for the other census fields, which map to NULL). Returns the member file.
fn use_census_parquet(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("anji.toml");
    let mut cfg: RawMemberConfig =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let src = cfg.sources.iter_mut().find(|s| s.name == "census").unwrap();
    src.format = "parquet".into();
    src.path = Some("data/anji/census.parquet".into());
    let census = cfg
        .mappings
        .iter_mut()
        .find(|m| m.dataset == "census")
        .unwrap();
    for f in [
        "pop_male",
        "pop_female",
        "pop_urban",
        "pop_rural",
        "family_households",
        "avg_years_schooling",
    ] {
        census.fields.insert(
            f.into(),
            fedgate::config::raw::RawFieldMapping::Expr("NULL".into()),
        );
    }
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

/// Anji's census moved from CSV to a typed Parquet file gives the same answer.
#[tokio::test]
async fn a_parquet_source_maps_like_a_csv_one() {
    let region = Region::start_only(Some(&[])).await;
    write_census_parquet(
        &region.data().join("anji/census.parquet"),
        &[
            ("330523", "安吉县", 586409, Some(14.03)),
            ("330599", "测试县", 1, None),
        ],
    );
    let path = use_census_parquet(&region.layout.dir);

    let report = fedgate::tools::check::check(&path).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        report.checked.iter().any(|c| c == "dataset census: 2 rows"),
        "{:?}",
        report.checked
    );

    let cfg = fedgate::config::MemberConfig::load(&path).unwrap();
    let engine = fedgate::owner::member::MemberEngine::build(Arc::new(cfg))
        .await
        .unwrap();
    let via = fedgate::trust::identity::Principal::parse("fedgate://yrd/city/shanghai").unwrap();
    let origin =
        fedgate::trust::identity::Principal::parse("fedgate://yrd/office/coordination").unwrap();
    // The data owner's network path: authorized, run and on the record.
    let audit = Arc::new(
        fedgate::ops::audit::AuditLog::open(&region.layout.dir.join("direct.log")).unwrap(),
    );
    let ask = fedgate::owner::SubQueryAsk {
        via: &via,
        origin: &origin,
        purpose: None,
        query_id: "t",
        sql: "SELECT county_code, pop_total, share_65_plus_pct FROM census ORDER BY county_code",
        covered: None,
        incident: None,
    };
    let stream = fedgate::owner::answer(
        &engine,
        &audit,
        fedgate::owner::Emergency::none(),
        ask,
        Default::default(),
    )
    .await
    .unwrap();
    let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    let log = fedgate::ops::audit::verify(audit.path()).unwrap();
    assert_eq!(log.records, 1, "the answer is on the record");
    assert!(log.broken.is_none());
    assert_eq!(
        column_strings(&batches, "county_code"),
        vec!["330523", "330599"]
    );
    assert_eq!(column_strings(&batches, "pop_total"), vec!["586409", "1"]);
    assert_eq!(
        column_strings(&batches, "share_65_plus_pct"),
        vec!["14.03", ""]
    );
}

/// A member caches the plans of sub-queries it has answered. A cached plan must
/// answer in full every time it runs, and a source file that changes (here: a
/// hospital appended to Hangzhou's CSV) must be planned anew, not read up to its old
/// length.
#[tokio::test]
async fn repeated_sub_queries_answer_in_full_and_see_a_changed_file() {
    let region = Region::start_only(Some(&["shanghai", "hangzhou"])).await;
    let client = region.client("shanghai");
    let file = region.data().join("hangzhou/fever_clinics.csv");
    let count = "SELECT count(*) AS n FROM fever_clinics WHERE member = 'hangzhou'";
    let names = "SELECT hospital_name FROM fever_clinics WHERE member = 'hangzhou'";
    let ask = |sql: &'static str| {
        let client = client.clone();
        async move {
            let a = client
                .query(sql, false, None)
                .await
                .unwrap_or_else(|f| panic!("{f}"));
            column_strings(&a.batches, a.schema.field(0).name())
        }
    };
    let before = crate::support::read_csv(&file).1.len();
    for _ in 0..3 {
        assert_eq!(ask(count).await, vec![before.to_string()]);
        assert_eq!(ask(names).await.len(), before);
    }
    let mut text = std::fs::read_to_string(&file).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("上城区,测试医院,测试路1号,,,否,2020/01/22\n");
    std::fs::write(&file, text).unwrap();
    for _ in 0..2 {
        assert_eq!(ask(count).await, vec![(before + 1).to_string()]);
        let got = ask(names).await;
        assert_eq!(got.len(), before + 1);
        assert!(got.iter().any(|n| n == "测试医院"), "the new row is read");
    }
}

/// The same for a Parquet file replaced by a longer one: a plan cached with the old
/// file's length would look for the footer in the wrong place.
#[tokio::test]
async fn a_replaced_parquet_file_is_planned_anew() {
    let two = [
        ("330523", "安吉县", 586409, Some(14.03)),
        ("330599", "测试县", 1, None),
    ];
    let region = Region::start_patched(Some(&["shanghai", "anji"]), &|m| {
        write_census_parquet(&m.dir.join("data/anji/census.parquet"), &two);
        use_census_parquet(&m.dir);
    })
    .await;
    let client = region.client("shanghai");
    let sql = "SELECT county_code FROM census WHERE member = 'anji' ORDER BY county_code";
    let ask = || async {
        let a = client
            .query(sql, false, None)
            .await
            .unwrap_or_else(|f| panic!("{f}"));
        column_strings(&a.batches, "county_code")
    };
    for _ in 0..3 {
        assert_eq!(ask().await, vec!["330523", "330599"]);
    }
    let mut three = two.to_vec();
    three.push(("330598", "另一个测试县", 2, Some(20.5)));
    write_census_parquet(&region.data().join("anji/census.parquet"), &three);
    for _ in 0..2 {
        assert_eq!(ask().await, vec!["330523", "330598", "330599"]);
    }
}
