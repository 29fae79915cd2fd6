//! Published services: named, parameterised queries declared in the region file
//! (`[[services]]`), called with `Federation.Invoke` or `POST /v1/services/{name}`.
//!
//! A call's parameters are checked against the declaration (every one present, none
//! extra, each of its declared type) and bound to the SQL's `$name` placeholders as
//! typed values in the logical plan. They never become SQL text, so a value cannot
//! change what the query does.

use std::collections::{BTreeMap, HashMap};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{ParamValues, ScalarValue};

use crate::config::{Region, Service};
use crate::error::{Error, Result};
use crate::proto::v1::{ParamValue, param_value};
use crate::trust::identity::Principal;

/// A parameter value as the caller sent it, before it is checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Given {
    /// A string.
    Text(String),
    /// An integer.
    Int(i64),
    /// A number that is not an integer (or one beyond 64 bits).
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// JSON `null`, or a gRPC parameter with no value set.
    Null,
    /// Something no parameter can be (a JSON array or object).
    Other(&'static str),
}

impl Given {
    fn describe(&self) -> &'static str {
        match self {
            Given::Text(_) => "a string",
            Given::Int(_) => "an integer",
            Given::Float(_) => "a number",
            Given::Bool(_) => "a boolean",
            Given::Null => "null",
            Given::Other(what) => what,
        }
    }

    /// From a JSON value.
    pub fn from_json(v: &serde_json::Value) -> Given {
        use serde_json::Value as J;
        match v {
            J::String(s) => Given::Text(s.clone()),
            J::Number(n) => match n.as_i64() {
                Some(i) => Given::Int(i),
                None => n.as_f64().map_or(Given::Other("a number"), Given::Float),
            },
            J::Bool(b) => Given::Bool(*b),
            J::Null => Given::Null,
            J::Array(_) => Given::Other("an array"),
            J::Object(_) => Given::Other("an object"),
        }
    }

    /// From a gRPC parameter.
    pub fn from_proto(v: &ParamValue) -> Given {
        match &v.value {
            Some(param_value::Value::Text(s)) => Given::Text(s.clone()),
            Some(param_value::Value::Int64(i)) => Given::Int(*i),
            Some(param_value::Value::Float64(f)) => Given::Float(*f),
            Some(param_value::Value::Boolean(b)) => Given::Bool(*b),
            None => Given::Null,
        }
    }
}

/// Looks a service up and checks that `caller` may call it.
pub fn find<'a>(region: &'a Region, name: &str, caller: &Principal) -> Result<&'a Service> {
    let s = region
        .services
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = region.services.iter().map(|s| s.name.as_str()).collect();
            Error::NotFound(format!(
                "no published service {name:?}; this region publishes: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?;
    if !s.allows(caller) {
        return Err(Error::PermissionDenied(format!(
            "{caller} may not call service {name} (callers: {})",
            s.callers.join(", ")
        )));
    }
    Ok(s)
}

/// Checks the given parameters against the service's declaration and converts them
/// to typed values. Every problem is reported at once, each naming its parameter.
pub fn bind(service: &Service, given: &BTreeMap<String, Given>) -> Result<ParamValues> {
    let mut problems = Vec::new();
    let mut values = HashMap::new();
    for p in &service.params {
        match given.get(&p.name) {
            None => problems.push(format!("missing parameter {} ({})", p.name, p.type_name)),
            Some(v) => match convert(v, &p.data_type) {
                Ok(s) => {
                    values.insert(p.name.clone(), s);
                }
                Err(why) => problems.push(format!("parameter {}: {why}", p.name)),
            },
        }
    }
    for name in given.keys() {
        if !service.params.iter().any(|p| &p.name == name) {
            let takes: Vec<String> = service
                .params
                .iter()
                .map(|p| format!("{} ({})", p.name, p.type_name))
                .collect();
            problems.push(format!(
                "unknown parameter {name}; {} takes: {}",
                service.name,
                if takes.is_empty() {
                    "no parameters".to_string()
                } else {
                    takes.join(", ")
                }
            ));
        }
    }
    if problems.is_empty() {
        Ok(ParamValues::from(values))
    } else {
        Err(Error::InvalidQuery(problems.join("; ")))
    }
}

/// Converts one value to the declared type, refusing anything that would need a
/// guess (a string for a number, a fraction for an integer).
fn convert(v: &Given, t: &DataType) -> std::result::Result<ScalarValue, String> {
    let wrong = |expected: &str| format!("expected {expected}, got {}", v.describe());
    Ok(match (t, v) {
        (DataType::Utf8, Given::Text(s)) => ScalarValue::Utf8(Some(s.clone())),
        (DataType::Utf8, _) => return Err(wrong("utf8 (a JSON string)")),
        (DataType::Int64, Given::Int(i)) => ScalarValue::Int64(Some(*i)),
        (DataType::Int64, _) => return Err(wrong("int64 (a JSON integer)")),
        (DataType::Float64, Given::Float(f)) => ScalarValue::Float64(Some(*f)),
        (DataType::Float64, Given::Int(i)) => ScalarValue::Float64(Some(*i as f64)),
        (DataType::Float64, _) => return Err(wrong("float64 (a JSON number)")),
        (DataType::Boolean, Given::Bool(b)) => ScalarValue::Boolean(Some(*b)),
        (DataType::Boolean, _) => return Err(wrong("boolean (true or false)")),
        (DataType::Date32, Given::Text(s)) => {
            let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|e| format!("{s:?} is not a date as YYYY-MM-DD: {e}"))?;
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
            ScalarValue::Date32(Some((d - epoch).num_days() as i32))
        }
        (DataType::Date32, _) => return Err(wrong("date (a JSON string YYYY-MM-DD)")),
        (other, _) => return Err(format!("parameters of type {other} are not supported")),
    })
}

/// The purpose a call states: the service's own, to which the caller may add a case
/// reference (`enrollment-check: AJ-2026-0117`); a caller's purpose with another
/// code is refused. A service without a purpose takes the caller's as it is.
pub fn purpose(service: &Service, given: Option<&str>) -> Result<String> {
    let given = given.filter(|g| !g.trim().is_empty());
    match (&service.purpose, given) {
        (None, g) => Ok(g.unwrap_or_default().to_string()),
        (Some(own), None) => Ok(own.clone()),
        (Some(own), Some(g)) => {
            let code = crate::owner::policy::purpose_code(own);
            if crate::owner::policy::purpose_code(g) == code {
                Ok(g.to_string())
            } else {
                Err(Error::InvalidQuery(format!(
                    "service {} is called for the purpose {code:?}; a stated purpose may only \
                     add a case reference to it ({code}: <reference>), not {g:?}",
                    service.name
                )))
            }
        }
    }
}

/// The parameters of a JSON body, which must be an object.
pub fn given_from_json(body: &serde_json::Value) -> Result<BTreeMap<String, Given>> {
    match body {
        serde_json::Value::Object(m) => Ok(m
            .iter()
            .map(|(k, v)| (k.clone(), Given::from_json(v)))
            .collect()),
        other => Err(Error::InvalidQuery(format!(
            "the request body must be a JSON object of parameters, not {}",
            Given::from_json(other).describe()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceParam;

    fn service() -> Service {
        Service {
            name: "near".into(),
            description: String::new(),
            callers: vec!["fedgate://yrd/county/*".into()],
            sql: "SELECT 1 WHERE $code = $code AND $n > 0".into(),
            purpose: Some("enrollment-check".into()),
            params: vec![
                ServiceParam {
                    name: "code".into(),
                    data_type: DataType::Utf8,
                    type_name: "utf8".into(),
                    description: String::new(),
                },
                ServiceParam {
                    name: "n".into(),
                    data_type: DataType::Int64,
                    type_name: "int64".into(),
                    description: String::new(),
                },
            ],
        }
    }

    fn json(v: serde_json::Value) -> Result<ParamValues> {
        bind(&service(), &given_from_json(&v)?)
    }

    #[test]
    fn binds_typed_values() {
        let p = json(serde_json::json!({"code": "330523", "n": 3})).unwrap();
        let ParamValues::Map(m) = p else {
            panic!("named parameters bind as a map")
        };
        assert_eq!(m["code"].value, ScalarValue::Utf8(Some("330523".into())));
        assert_eq!(m["n"].value, ScalarValue::Int64(Some(3)));
    }

    #[test]
    fn every_problem_names_its_parameter() {
        let e = json(serde_json::json!({"code": 330523, "extra": 1}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parameter code: expected utf8 (a JSON string), got an integer"),
            "{e}"
        );
        assert!(e.contains("missing parameter n (int64)"), "{e}");
        assert!(
            e.contains("unknown parameter extra; near takes: code (utf8), n (int64)"),
            "{e}"
        );
        let e = json(serde_json::json!({"code": "x", "n": 1.5}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parameter n: expected int64 (a JSON integer), got a number"),
            "{e}"
        );
        let e = json(serde_json::json!(["x"])).unwrap_err().to_string();
        assert!(
            e.contains("must be a JSON object of parameters, not an array"),
            "{e}"
        );
        let e = json(serde_json::json!({"code": null, "n": 1}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parameter code: expected utf8 (a JSON string), got null"),
            "{e}"
        );
    }

    #[test]
    fn a_service_purpose_takes_a_reference_but_not_another_code() {
        let s = service();
        assert_eq!(purpose(&s, None).unwrap(), "enrollment-check");
        assert_eq!(purpose(&s, Some(" ")).unwrap(), "enrollment-check");
        assert_eq!(
            purpose(&s, Some("enrollment-check: AJ-1")).unwrap(),
            "enrollment-check: AJ-1"
        );
        let e = purpose(&s, Some("insurance-transfer: AJ-1")).unwrap_err();
        assert!(
            e.to_string()
                .contains("called for the purpose \"enrollment-check\""),
            "{e}"
        );
        let open = Service {
            purpose: None,
            ..service()
        };
        assert_eq!(purpose(&open, Some("x: y")).unwrap(), "x: y");
    }

    #[test]
    fn proto_values_are_checked_the_same_way() {
        let given: BTreeMap<String, Given> = [
            (
                "code".to_string(),
                Given::from_proto(&ParamValue {
                    value: Some(param_value::Value::Int64(5)),
                }),
            ),
            (
                "n".to_string(),
                Given::from_proto(&ParamValue { value: None }),
            ),
        ]
        .into_iter()
        .collect();
        let e = bind(&service(), &given).unwrap_err().to_string();
        assert!(e.contains("parameter code: expected utf8"), "{e}");
        assert!(
            e.contains("parameter n: expected int64 (a JSON integer), got null"),
            "{e}"
        );
    }
}
