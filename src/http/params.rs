//! Query parameters and request headers of the Riak HTTP API, parsed into dynkv's options.
//! Every problem becomes a 400 whose message names the parameter.

use super::HttpError;
use crate::core::quorum::Quorum;
use crate::protocol::{GetOptions, PutOptions};
use std::collections::HashMap;

/// The query string as name → value (the last value wins, as in Riak's webmachine).
pub type Query = HashMap<String, String>;

fn quorum(query: &Query, name: &str) -> Result<Quorum, HttpError> {
    match query.get(name) {
        None => Ok(Quorum::Default),
        Some(text) => text
            .parse::<Quorum>()
            .map_err(|error| HttpError::bad_request(format!("{name}: {error}"))),
    }
}

/// A `true`/`false` parameter; absent is `default`.
pub fn flag(query: &Query, name: &str, default: bool) -> Result<bool, HttpError> {
    match query.get(name).map(String::as_str) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(HttpError::bad_request(format!(
            "{name}={other:?} is not valid: {name} must be true or false"
        ))),
    }
}

fn timeout_ms(query: &Query) -> Result<Option<u64>, HttpError> {
    match query.get("timeout") {
        None => Ok(None),
        Some(text) => match text.parse::<u64>() {
            Ok(ms) if (1..=600_000).contains(&ms) => Ok(Some(ms)),
            _ => Err(HttpError::bad_request(format!(
                "timeout={text:?} is not valid: timeout must be milliseconds between 1 and 600000"
            ))),
        },
    }
}

/// `r`, `pr`, `timeout`, dynkv's `sloppy_quorum` (default true) and `ask_all_replicas`
/// (default false: only as many replicas as `r` and `pr` need, see the node's
/// `read_repair_chance`); `basic_quorum` and `notfound_ok` are checked and accepted (dynkv
/// always counts a not-found reply and always waits for `r` replies).
pub fn get_options(query: &Query) -> Result<GetOptions, HttpError> {
    flag(query, "basic_quorum", false)?;
    flag(query, "notfound_ok", true)?;
    Ok(GetOptions {
        r: quorum(query, "r")?,
        pr: quorum(query, "pr")?,
        timeout_ms: timeout_ms(query)?,
        sloppy_quorum: Some(flag(query, "sloppy_quorum", true)?),
        ask_all_replicas: flag(query, "ask_all_replicas", false)?.then_some(true),
    })
}

/// `w`, `dw`, `pw`, `returnbody`, `timeout`, and dynkv's `sloppy_quorum` (default true).
pub fn put_options(query: &Query) -> Result<PutOptions, HttpError> {
    Ok(PutOptions {
        w: quorum(query, "w")?,
        dw: quorum(query, "dw")?,
        pw: quorum(query, "pw")?,
        timeout_ms: timeout_ms(query)?,
        return_body: flag(query, "returnbody", false)?,
        sloppy_quorum: Some(flag(query, "sloppy_quorum", true)?),
        r: None,
    })
}

/// A delete's quorums: Riak's `rw` stands for `w` when `w` is not given.
pub fn delete_options(query: &Query) -> Result<PutOptions, HttpError> {
    let mut options = put_options(query)?;
    if !query.contains_key("w") {
        options.w = quorum(query, "rw")?;
    }
    options.r = Some(quorum(query, "r")?);
    Ok(options)
}

/// A quorum as Riak shows it in JSON: a number, or the symbolic name.
pub fn quorum_json(level: Quorum) -> serde_json::Value {
    match level {
        Quorum::Count(count) => serde_json::Value::from(count),
        other => serde_json::Value::from(other.to_string()),
    }
}

/// A quorum from a bucket-properties JSON value: a number or a name.
pub fn quorum_from_json(name: &str, value: &serde_json::Value) -> Result<Quorum, HttpError> {
    let text = match value {
        serde_json::Value::Number(number) => number.to_string(),
        serde_json::Value::String(text) => text.clone(),
        _ => {
            return Err(HttpError::bad_request(format!(
                "{name} must be a number or one of \"one\", \"quorum\", \"all\", \"default\""
            )));
        }
    };
    text.parse::<Quorum>()
        .map_err(|error| HttpError::bad_request(format!("{name}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Query {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn riak_values_parse_and_bad_ones_name_the_parameter() {
        let options =
            get_options(&query(&[("r", "all"), ("pr", "2"), ("timeout", "500")])).unwrap();
        assert_eq!(
            (options.r, options.pr, options.timeout_ms),
            (Quorum::All, Quorum::Count(2), Some(500))
        );
        let options = put_options(&query(&[("w", "one"), ("returnbody", "true")])).unwrap();
        assert_eq!((options.w, options.return_body), (Quorum::One, true));
        let options = delete_options(&query(&[("rw", "quorum")])).unwrap();
        assert_eq!(options.w, Quorum::Quorum);
        for (name, value) in [
            ("r", "most"),
            ("pr", "-1"),
            ("basic_quorum", "yes"),
            ("timeout", "0"),
        ] {
            let error = get_options(&query(&[(name, value)])).unwrap_err();
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(error.message.starts_with(name), "{}", error.message);
        }
        let error = put_options(&query(&[("dw", "x")])).unwrap_err();
        assert!(error.message.starts_with("dw"), "{}", error.message);
    }

    #[test]
    fn quorums_round_trip_through_riak_json() {
        for level in [
            Quorum::One,
            Quorum::Quorum,
            Quorum::All,
            Quorum::Default,
            Quorum::Count(2),
        ] {
            assert_eq!(quorum_from_json("r", &quorum_json(level)).unwrap(), level);
        }
        assert!(quorum_from_json("r", &serde_json::Value::Bool(true)).is_err());
    }
}
