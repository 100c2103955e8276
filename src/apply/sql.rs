//! SQL text generation for apply: staging tables, the set-wise DELETE / INSERT … ON CONFLICT /
//! UPDATE statements, and the analysis of transform expressions they need.
//!
//! Owns every statement apply sends to the target, as pure functions of an [`ApplyTarget`] and
//! a [`StageShape`]. It must never do I/O and never splice a name into SQL unquoted.
//!
//! The statements read a stage table through a "typed" subquery that presents the staged
//! columns under the source column names with the source types (text-staged values are cast
//! there), so that transform expressions are evaluated exactly as written, once per row.

use std::collections::HashSet;

use super::{ApplyError, ApplyTarget};

/// Name of the per-row ordinal column in stage tables (reserved: no source column may use it).
pub const ROW_COL: &str = "shadowmig$row";
/// Name of the per-row `bool[]` of unchanged-TOAST flags, indexed by source column + 1.
pub const UNCHANGED_COL: &str = "shadowmig$u";
const SRC_ALIAS: &str = "shadowmig$src";
const T_ALIAS: &str = "shadowmig$t";
const V_ALIAS: &str = "shadowmig$v";

/// Quotes an SQL identifier (`"` doubled), so any name — spaces, capitals, quotes, unicode —
/// is taken literally.
pub fn quote_ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for ch in name.chars() {
        if ch == '"' {
            s.push('"');
        }
        s.push(ch);
    }
    s.push('"');
    s
}

/// What apply knows about a target after validating it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The target table, quoted and schema-qualified.
    pub table_sql: String,
    /// Per source column: part of the identity.
    pub identity: Vec<bool>,
    /// Per target column: the source column it copies unchanged, if it is a plain copy.
    pub copy_of: Vec<Option<usize>>,
    /// Per target column: the source columns its expression references (over-approximated).
    pub deps: Vec<Vec<usize>>,
    /// Per target column: part of the target key.
    pub is_key: Vec<bool>,
    /// Target key columns as indexes into `target_columns`, in `target_key` order.
    pub key_cols: Vec<usize>,
}

impl Plan {
    /// Validates `t` and analyses its expressions.
    pub fn new(t: &ApplyTarget) -> Result<Plan, ApplyError> {
        let bad = |m: String| Err(ApplyError::InvalidTarget(m));
        if t.source_columns.is_empty() {
            return bad("the source has no columns".into());
        }
        if t.target_columns.is_empty() {
            return bad("no target columns".into());
        }
        if t.target_key.is_empty() {
            return bad("no target key columns".into());
        }
        for name in t
            .source_columns
            .iter()
            .map(|c| &c.name)
            .chain(t.target_columns.iter().map(|c| &c.name))
            .chain([&t.table.0, &t.table.1])
        {
            if name.is_empty() || name.contains('\0') {
                return bad(format!("invalid name {name:?}"));
            }
        }
        for c in &t.source_columns {
            if c.name.starts_with("shadowmig$") {
                return bad(format!("source column name {:?} is reserved", c.name));
            }
            if c.type_sql.trim().is_empty() || c.type_sql.contains(';') {
                return bad(format!(
                    "invalid type {:?} of column {:?}",
                    c.type_sql, c.name
                ));
            }
        }
        let mut seen = HashSet::new();
        for c in &t.source_columns {
            if !seen.insert(&c.name) {
                return bad(format!("duplicate source column {:?}", c.name));
            }
        }
        let mut seen = HashSet::new();
        for c in &t.target_columns {
            if !seen.insert(&c.name) {
                return bad(format!("duplicate target column {:?}", c.name));
            }
            if c.expr.trim().is_empty() {
                return bad(format!("empty expression for target column {:?}", c.name));
            }
        }
        let identity: Vec<bool> = t.source_columns.iter().map(|c| c.is_identity).collect();
        if !identity.iter().any(|&b| b) {
            return bad("no source column is marked as identity".into());
        }
        let mut key_cols = Vec::new();
        for k in &t.target_key {
            match t.target_columns.iter().position(|c| &c.name == k) {
                Some(i) if !key_cols.contains(&i) => key_cols.push(i),
                Some(_) => return bad(format!("target key column {k:?} listed twice")),
                None => return bad(format!("target key column {k:?} is not a target column")),
            }
        }
        let names: Vec<&str> = t.source_columns.iter().map(|c| c.name.as_str()).collect();
        let mut copy_of = Vec::new();
        let mut deps = Vec::new();
        for c in &t.target_columns {
            let toks = identifiers(&c.expr);
            let d: Vec<usize> = (0..names.len())
                .filter(|&i| toks.refs.iter().any(|r| r.matches(names[i])))
                .collect();
            let copy = if toks.only_one_identifier && d.len() == 1 {
                Some(d[0])
            } else {
                None
            };
            copy_of.push(copy);
            deps.push(d);
        }
        for &k in &key_cols {
            if deps[k].iter().any(|&s| !identity[s]) {
                return bad(format!(
                    "target key column {:?} depends on a source column outside the identity; \
                     deletes and key changes could not find its rows (use a replica identity \
                     that covers it, or REPLICA IDENTITY FULL)",
                    t.target_columns[k].name
                ));
            }
        }
        let is_key = (0..t.target_columns.len())
            .map(|i| key_cols.contains(&i))
            .collect();
        Ok(Plan {
            table_sql: format!("{}.{}", quote_ident(&t.table.0), quote_ident(&t.table.1)),
            identity,
            copy_of,
            deps,
            is_key,
            key_cols,
        })
    }
}

/// An identifier reference found in an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ref {
    /// `"Name"`: matches exactly.
    Quoted(String),
    /// `name`: PostgreSQL folds it to lower case.
    Bare(String),
}

impl Ref {
    fn matches(&self, column: &str) -> bool {
        match self {
            Ref::Quoted(s) => s == column,
            Ref::Bare(s) => *s == column,
        }
    }
}

struct Tokens {
    refs: Vec<Ref>,
    only_one_identifier: bool,
}

/// Finds the identifiers of an SQL expression, skipping string literals and comments. It
/// over-approximates references (a function named like a column counts), which only costs a
/// re-read, never a wrong value.
fn identifiers(expr: &str) -> Tokens {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Vec::new();
    let mut other = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            other = true;
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                // E'' strings may escape a quote with a backslash.
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' {
                    if chars.get(i + 1) == Some(&'"') {
                        s.push('"');
                        i += 2;
                        continue;
                    }
                    break;
                }
                s.push(chars[i]);
                i += 1;
            }
            i += 1;
            refs.push(Ref::Quoted(s));
        } else if c.is_alphabetic() || c == '_' {
            let mut s = String::new();
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                s.extend(chars[i].to_lowercase());
                i += 1;
            }
            refs.push(Ref::Bare(s));
        } else if c == '$' && chars.get(i + 1) == Some(&'$') {
            // Dollar-quoted literal without tag: skip to the closing $$.
            other = true;
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '$' && chars[i + 1] == '$') {
                i += 1;
            }
            i += 2;
        } else {
            other = true;
            i += 1;
        }
    }
    let only_one_identifier = !other && refs.len() == 1;
    Tokens {
        refs,
        only_one_identifier,
    }
}

/// Whether a stage holds upserts or deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageKind {
    /// Final images (every source column).
    Upsert,
    /// Final images of rows the target should not have (every source column; a stage of its
    /// own, so that a batch with both never empties one stage twice).
    Insert,
    /// Old identities (identity columns only).
    Delete,
}

/// The shape of one stage table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StageShape {
    /// Upserts or deletes.
    pub kind: StageKind,
    /// Per source column: staged as `text` (values arrived in text form) instead of its type.
    pub text: Vec<bool>,
    /// Rows carry the unchanged-TOAST flag array.
    pub with_unchanged: bool,
}

impl StageShape {
    /// Source columns present in this stage, in stage order.
    pub fn columns(&self, plan: &Plan) -> Vec<usize> {
        (0..plan.identity.len())
            .filter(|&i| self.kind != StageKind::Delete || plan.identity[i])
            .collect()
    }
}

fn stage_col(i: usize) -> String {
    quote_ident(&format!("c{i}"))
}

/// `CREATE TEMP TABLE` for a stage.
pub fn create_stage(t: &ApplyTarget, plan: &Plan, shape: &StageShape, name: &str) -> String {
    let mut cols = vec![format!("{} int4", quote_ident(ROW_COL))];
    if shape.with_unchanged {
        cols.push(format!("{} bool[]", quote_ident(UNCHANGED_COL)));
    }
    for i in shape.columns(plan) {
        let ty = if shape.text[i] {
            "text"
        } else {
            t.source_columns[i].type_sql.as_str()
        };
        cols.push(format!("{} {}", stage_col(i), ty));
    }
    format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS",
        quote_ident(name),
        cols.join(", ")
    )
}

/// `COPY … FROM STDIN (FORMAT binary)` into a stage, columns in stage order.
pub fn copy_into_stage(plan: &Plan, shape: &StageShape, name: &str) -> String {
    let mut cols = vec![quote_ident(ROW_COL)];
    if shape.with_unchanged {
        cols.push(quote_ident(UNCHANGED_COL));
    }
    cols.extend(shape.columns(plan).into_iter().map(stage_col));
    format!(
        "COPY pg_temp.{} ({}) FROM STDIN (FORMAT binary)",
        quote_ident(name),
        cols.join(", ")
    )
}

/// The typed view of a stage: source names and types, plus the row ordinal and flags.
fn typed(t: &ApplyTarget, plan: &Plan, shape: &StageShape, name: &str) -> String {
    let mut cols = vec![format!("s.{0} AS {0}", quote_ident(ROW_COL))];
    if shape.with_unchanged {
        cols.push(format!("s.{0} AS {0}", quote_ident(UNCHANGED_COL)));
    }
    for i in shape.columns(plan) {
        let sc = &t.source_columns[i];
        if shape.text[i] {
            cols.push(format!(
                "s.{}::{} AS {}",
                stage_col(i),
                sc.type_sql,
                quote_ident(&sc.name)
            ));
        } else {
            cols.push(format!("s.{} AS {}", stage_col(i), quote_ident(&sc.name)));
        }
    }
    format!(
        "(SELECT {} FROM pg_temp.{} s) AS {}",
        cols.join(", "),
        quote_ident(name),
        quote_ident(SRC_ALIAS)
    )
}

/// Deletes the target rows whose key the staged old identities map to.
pub fn delete(t: &ApplyTarget, plan: &Plan, shape: &StageShape, name: &str) -> String {
    let keys: Vec<String> = plan
        .key_cols
        .iter()
        .enumerate()
        .map(|(j, &k)| format!("({}) AS {}", t.target_columns[k].expr, stage_col(j)))
        .collect();
    let on: Vec<String> = plan
        .key_cols
        .iter()
        .enumerate()
        .map(|(j, &k)| {
            format!(
                "{}.{} = {}.{}",
                quote_ident(T_ALIAS),
                quote_ident(&t.target_columns[k].name),
                quote_ident(V_ALIAS),
                stage_col(j)
            )
        })
        .collect();
    format!(
        "DELETE FROM {} AS {} USING (SELECT {} FROM {}) AS {} WHERE {}",
        plan.table_sql,
        quote_ident(T_ALIAS),
        keys.join(", "),
        typed(t, plan, shape, name),
        quote_ident(V_ALIAS),
        on.join(" AND ")
    )
}

/// Inserts the staged final images, overwriting existing rows with the same target key.
pub fn upsert(t: &ApplyTarget, plan: &Plan, shape: &StageShape, name: &str) -> String {
    let keys: Vec<String> = plan
        .key_cols
        .iter()
        .map(|&k| quote_ident(&t.target_columns[k].name))
        .collect();
    let sets: Vec<String> = t
        .target_columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !plan.is_key[*i])
        .map(|(_, c)| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
        .collect();
    let action = if sets.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    format!(
        "{} ON CONFLICT ({}) {}",
        insert(t, plan, shape, name),
        keys.join(", "),
        action
    )
}

/// Inserts the staged final images of rows the target should not have: a plain INSERT, which
/// skips `ON CONFLICT`'s speculative insertion (a third less time per row on this machine)
/// and fails with a unique violation if a row is there after all.
pub fn insert(t: &ApplyTarget, plan: &Plan, shape: &StageShape, name: &str) -> String {
    let names: Vec<String> = t
        .target_columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let exprs: Vec<String> = t
        .target_columns
        .iter()
        .map(|c| format!("({})", c.expr))
        .collect();
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM {}",
        plan.table_sql,
        names.join(", "),
        exprs.join(", "),
        typed(t, plan, shape, name),
    )
}

/// Updates existing rows from staged images that hold unchanged-TOAST columns: a plain copy of
/// an unchanged source column keeps the target's value. Returns (`RETURNING`) the row ordinals
/// it matched; the others have no target row and must be re-read.
pub fn update_keeping_unchanged(
    t: &ApplyTarget,
    plan: &Plan,
    shape: &StageShape,
    name: &str,
) -> String {
    let tq = quote_ident(T_ALIAS);
    let vq = quote_ident(V_ALIAS);
    let mut inner = vec![quote_ident(ROW_COL), quote_ident(UNCHANGED_COL)];
    inner.extend(
        t.target_columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("({}) AS {}", c.expr, stage_col(i))),
    );
    let sets: Vec<String> = t
        .target_columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !plan.is_key[*i])
        .map(|(i, c)| {
            let col = quote_ident(&c.name);
            match plan.copy_of[i] {
                Some(s) => format!(
                    "{col} = CASE WHEN {vq}.{}[{}] THEN {tq}.{col} ELSE {vq}.{} END",
                    quote_ident(UNCHANGED_COL),
                    s + 1,
                    stage_col(i)
                ),
                None => format!("{col} = {vq}.{}", stage_col(i)),
            }
        })
        .collect();
    let on: Vec<String> = plan
        .key_cols
        .iter()
        .map(|&k| {
            format!(
                "{tq}.{} = {vq}.{}",
                quote_ident(&t.target_columns[k].name),
                stage_col(k)
            )
        })
        .collect();
    // All-key targets have nothing to set; a no-op assignment keeps the statement valid and
    // still reports which rows exist.
    let sets = if sets.is_empty() {
        let k = quote_ident(&t.target_columns[plan.key_cols[0]].name);
        format!("{k} = {tq}.{k}")
    } else {
        sets.join(", ")
    };
    format!(
        "UPDATE {} AS {tq} SET {} FROM (SELECT {} FROM {}) AS {vq} WHERE {} RETURNING {vq}.{}",
        plan.table_sql,
        sets,
        inner.join(", "),
        typed(t, plan, shape, name),
        on.join(" AND "),
        quote_ident(ROW_COL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{SourceColumn, TargetColumn};

    fn target() -> ApplyTarget {
        ApplyTarget {
            table: ("public".into(), "Ordérs \"v2\"".into()),
            source_columns: vec![
                SourceColumn {
                    name: "id".into(),
                    type_sql: "bigint".into(),
                    is_identity: true,
                },
                SourceColumn {
                    name: "Total Amount".into(),
                    type_sql: "numeric(12,2)".into(),
                    is_identity: false,
                },
                SourceColumn {
                    name: "note".into(),
                    type_sql: "text".into(),
                    is_identity: false,
                },
            ],
            target_columns: vec![
                TargetColumn::copy("id"),
                TargetColumn::expr("minor", "(\"Total Amount\" * 100)::bigint"),
                TargetColumn::copy("note"),
                TargetColumn::expr("currency", "'USD -- \"note\"'"),
            ],
            target_key: vec!["id".into()],
        }
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b c"), "\"a\"\"b c\"");
        assert_eq!(quote_ident("Ω"), "\"Ω\"");
    }

    #[test]
    fn plan_finds_copies_and_dependencies() {
        let p = Plan::new(&target()).unwrap();
        assert_eq!(p.copy_of, vec![Some(0), None, Some(2), None]);
        assert_eq!(p.deps, vec![vec![0], vec![1], vec![2], vec![]]);
        assert_eq!(p.key_cols, vec![0]);
        assert_eq!(p.table_sql, "\"public\".\"Ordérs \"\"v2\"\"\"");
        // A bare identifier folds to lower case, as PostgreSQL does.
        let mut t = target();
        t.target_columns[2] = TargetColumn::expr("note", "NOTE");
        assert_eq!(Plan::new(&t).unwrap().copy_of[2], Some(2));
        t.target_columns[2] = TargetColumn::expr("note", "upper(note)");
        assert_eq!(Plan::new(&t).unwrap().copy_of[2], None);
    }

    #[test]
    fn plan_rejects_bad_targets() {
        let mut t = target();
        t.target_key = vec!["nope".into()];
        assert!(Plan::new(&t).is_err());
        let mut t = target();
        t.target_key = vec!["minor".into()];
        let e = Plan::new(&t).unwrap_err().to_string();
        assert!(e.contains("outside the identity"), "{e}");
        let mut t = target();
        t.source_columns[0].is_identity = false;
        assert!(Plan::new(&t).is_err());
        let mut t = target();
        t.source_columns[2].name = "shadowmig$row".into();
        assert!(Plan::new(&t).is_err());
        let mut t = target();
        t.source_columns[1].type_sql = "int; DROP TABLE x".into();
        assert!(Plan::new(&t).is_err());
    }

    #[test]
    fn statements_quote_names_and_cast_text_columns() {
        let t = target();
        let p = Plan::new(&t).unwrap();
        let shape = StageShape {
            kind: StageKind::Upsert,
            text: vec![false, true, false],
            with_unchanged: false,
        };
        let up = upsert(&t, &p, &shape, "st");
        assert!(
            up.contains("s.\"c1\"::numeric(12,2) AS \"Total Amount\""),
            "{up}"
        );
        assert!(up.contains("ON CONFLICT (\"id\") DO UPDATE SET \"minor\" = EXCLUDED.\"minor\""));
        let del = delete(
            &t,
            &p,
            &StageShape {
                kind: StageKind::Delete,
                text: vec![false; 3],
                with_unchanged: false,
            },
            "sd",
        );
        assert!(
            !del.contains("\"c1\""),
            "deletes stage identity columns only: {del}"
        );
        let u = update_keeping_unchanged(
            &t,
            &p,
            &StageShape {
                with_unchanged: true,
                ..shape
            },
            "su",
        );
        assert!(
            u.contains("CASE WHEN \"shadowmig$v\".\"shadowmig$u\"[3]"),
            "{u}"
        );
        assert!(u.ends_with("RETURNING \"shadowmig$v\".\"shadowmig$row\""));
    }
}
