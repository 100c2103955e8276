//! What a finished verify tells: the report, its human rendering and its JSON form.

use std::collections::BTreeMap;

use serde::Serialize;

use super::sql::ExcludedColumn;

/// How a key differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// In transform(source), not in the target.
    Missing,
    /// In the target, not in transform(source).
    Extra,
    /// In both, with different values.
    Different,
}

impl DiffKind {
    /// `missing` / `extra` / `different`.
    pub fn name(self) -> &'static str {
        match self {
            DiffKind::Missing => "missing",
            DiffKind::Extra => "extra",
            DiffKind::Different => "different",
        }
    }
}

/// One key that differs, with both sides' rows (`None`: absent on that side).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// The target key's columns and values.
    pub key: BTreeMap<String, serde_json::Value>,
    /// How it differs.
    pub kind: DiffKind,
    /// transform(source)'s row, as JSON.
    pub source: Option<serde_json::Value>,
    /// The target's row, as JSON.
    pub target: Option<serde_json::Value>,
}

impl Difference {
    /// A stable order for reports: by key text.
    pub fn sort_key(&self) -> String {
        serde_json::to_string(&self.key).unwrap_or_default()
    }
}

/// The result of a finished verify. Its JSON form is the `--json` contract: at least `equal`,
/// `rows_source`, `rows_target` and `differences`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// No difference and nothing unsettled.
    pub equal: bool,
    /// Rows of transform(source) read by the aggregate pass.
    pub rows_source: u64,
    /// Rows of the target read by the aggregate pass.
    pub rows_target: u64,
    /// Aggregate chunks read (both sides, saved ones of a resumed run included).
    pub chunks: u64,
    /// Continued from a saved frontier.
    pub resumed: bool,
    /// Buckets whose aggregates differed.
    pub differing_buckets: usize,
    /// Keys that differed while narrowing (before the re-check).
    pub candidates: usize,
    /// Compared key presence only.
    pub keys_only: bool,
    /// The differences that persisted through every re-check round.
    pub differences: Vec<Difference>,
    /// Keys apply never passed within the timeout (an error, exit 2: not a difference).
    pub unsettled: Vec<BTreeMap<String, serde_json::Value>>,
    /// More differences exist than are listed.
    pub truncated: bool,
    /// Target columns not compared, and why.
    pub excluded_columns: Vec<ExcludedColumn>,
    /// Wall time.
    pub duration_ms: u64,
}

fn compact(v: &Option<serde_json::Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => v.to_string(),
    }
}

/// Only the columns whose values differ, from each side (JSON keeps the whole rows).
fn differing_columns(a: &serde_json::Value, b: &serde_json::Value) -> (String, String) {
    match (a.as_object(), b.as_object()) {
        (Some(x), Some(y)) => {
            let pick = |from: &serde_json::Map<String, serde_json::Value>,
                        other: &serde_json::Map<String, serde_json::Value>| {
                let m: serde_json::Map<String, serde_json::Value> = from
                    .iter()
                    .filter(|(k, v)| other.get(*k) != Some(*v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                serde_json::Value::Object(m).to_string()
            };
            (pick(x, y), pick(y, x))
        }
        _ => (a.to_string(), b.to_string()),
    }
}

impl VerifyReport {
    /// Exit code: 0 equal, 1 differences, 2 keys that could not be settled.
    pub fn exit_code(&self) -> i32 {
        if !self.unsettled.is_empty() {
            2
        } else if self.differences.is_empty() {
            0
        } else {
            1
        }
    }

    /// The human report: one line per difference (for `different`, the columns that differ),
    /// then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.differences {
            let (src, tgt) = match (&d.source, &d.target) {
                (Some(a), Some(b)) => differing_columns(a, b),
                _ => (compact(&d.source), compact(&d.target)),
            };
            out.push_str(&format!(
                "{} {}: source {src} | target {tgt}\n",
                d.kind.name(),
                serde_json::to_string(&d.key).unwrap_or_default(),
            ));
        }
        for k in &self.unsettled {
            out.push_str(&format!(
                "unsettled {}: apply did not pass the position it was read at in time\n",
                serde_json::to_string(k).unwrap_or_default()
            ));
        }
        for e in &self.excluded_columns {
            out.push_str(&format!(
                "not compared: target column {:?}: {}\n",
                e.column, e.reason
            ));
        }
        let verdict = if !self.unsettled.is_empty() {
            format!("{} key(s) could not be settled", self.unsettled.len())
        } else if self.equal {
            "equal".to_string()
        } else {
            format!(
                "{}{} difference(s)",
                self.differences.len(),
                if self.truncated { "+" } else { "" }
            )
        };
        out.push_str(&format!(
            "verify{}: {verdict}; {} source rows, {} target rows compared in {} chunks{}, {} candidate key(s) re-checked, {:.1} s\n",
            if self.keys_only { " (keys only)" } else { "" },
            self.rows_source,
            self.rows_target,
            self.chunks,
            if self.resumed { " (resumed)" } else { "" },
            self.candidates,
            self.duration_ms as f64 / 1000.0
        ));
        out
    }

    /// The `--json` form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_lines_show_only_differing_columns() {
        let d = Difference {
            key: [("id".to_string(), serde_json::json!(5))].into(),
            kind: DiffKind::Different,
            source: Some(serde_json::json!({"id": 5, "note": "a", "s": "x"})),
            target: Some(serde_json::json!({"id": 5, "note": "b", "s": "x"})),
        };
        let r = VerifyReport {
            equal: false,
            rows_source: 1,
            rows_target: 1,
            chunks: 2,
            resumed: false,
            differing_buckets: 1,
            candidates: 1,
            keys_only: false,
            differences: vec![d],
            unsettled: vec![],
            truncated: false,
            excluded_columns: vec![],
            duration_ms: 10,
        };
        let text = r.render();
        assert!(
            text.starts_with(
                "different {\"id\":5}: source {\"note\":\"a\"} | target {\"note\":\"b\"}\n"
            ),
            "{text}"
        );
        assert_eq!(r.exit_code(), 1);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["differences"][0]["source"]["s"], "x");
    }
}
