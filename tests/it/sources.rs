//! Local sources other than the sample region's CSV files.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use fedgate::config::raw::RawMemberConfig;

use crate::support::{Region, column_strings};

/// Anji's census moved from CSV to a typed Parquet file gives the same answer.
#[tokio::test]
async fn a_parquet_source_maps_like_a_csv_one() {
    let region = Region::start_only(Some(&[])).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("dm", DataType::Utf8, false),
        Field::new("mc", DataType::Utf8, false),
        Field::new("rk", DataType::Int64, false),
        Field::new("lnzb", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["330523", "330599"])),
            Arc::new(StringArray::from(vec!["安吉县", "测试县"])),
            Arc::new(Int64Array::from(vec![586409, 1])),
            Arc::new(Float64Array::from(vec![Some(14.03), None])),
        ],
    )
    .unwrap();
    let file = region.data().join("anji/census.parquet");
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&file).unwrap(),
        schema,
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let path = region.layout.dir.join("anji.toml");
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

    let report = fedgate::check::check(&path).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        report.checked.iter().any(|c| c == "dataset census: 2 rows"),
        "{:?}",
        report.checked
    );

    let cfg = fedgate::config::MemberConfig::load(&path).unwrap();
    let engine = fedgate::member::MemberEngine::build(Arc::new(cfg))
        .await
        .unwrap();
    let via = fedgate::identity::Principal::parse("fedgate://yrd/city/shanghai").unwrap();
    let origin = fedgate::identity::Principal::parse("fedgate://yrd/office/coordination").unwrap();
    // The data owner's network path: authorized, run and on the record.
    let audit =
        Arc::new(fedgate::audit::AuditLog::open(&region.layout.dir.join("direct.log")).unwrap());
    let ask = fedgate::owner::Ask {
        via: &via,
        origin: &origin,
        purpose: None,
        query_id: "t",
        sql: "SELECT county_code, pop_total, share_65_plus_pct FROM census ORDER BY county_code",
    };
    let stream = fedgate::owner::answer(&engine, &audit, ask, Default::default())
        .await
        .unwrap();
    let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    let log = fedgate::audit::verify(audit.path()).unwrap();
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
