//! What verify compares and the SQL that compares it: the per-column source expressions
//! (transform, same-named column, or a constant default), the target key, and the statements
//! of the aggregate, narrowing and re-check passes. Pure string building, no I/O.
//!
//! Both sides render a row the same way: `ROW(v1, v2, …)::text` over the target column types,
//! so every type with a text output (point, json, extension types) compares, with or without
//! an equality operator.

use crate::spec::quote_ident;

/// Number of hash buckets the per-chunk aggregates fall into (a power of two).
pub const BUCKETS: usize = 4096;

/// One compared target column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComparedColumn {
    /// The target column's name.
    pub name: String,
    /// Its type as `format_type` prints it (what the source expression is cast to).
    pub type_name: String,
    /// The SQL over source columns that yields it.
    pub source_expr: String,
    /// The source expression is a plain reference to a source column of that name, so
    /// lookups by key can use the source's own index.
    pub plain_column: bool,
}

/// A target column left out of the comparison, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExcludedColumn {
    /// The target column.
    pub column: String,
    /// Why it is not compared.
    pub reason: String,
}

/// The compared shape of transform(source) and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The source table, quoted.
    pub source_sql: String,
    /// The alias the source leaves are read under (the source table's own name, so a
    /// transform may qualify columns with it).
    pub source_alias: String,
    /// The target table, quoted.
    pub target_sql: String,
    /// The alias the target leaves are read under.
    pub target_alias: String,
    /// The compared columns, in target attribute order.
    pub columns: Vec<ComparedColumn>,
    /// Positions in `columns` of the target key, in key order.
    pub key: Vec<usize>,
    /// Columns not compared.
    pub excluded: Vec<ExcludedColumn>,
    /// Compare key presence only.
    pub keys_only: bool,
}

/// Which table a statement reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// transform(source).
    Source,
    /// The target.
    Target,
}

impl Side {
    /// `source` / `target`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

impl Shape {
    /// The value expressions of every compared column on `side`.
    pub fn values(&self, side: Side) -> Vec<String> {
        self.columns
            .iter()
            .map(|c| self.value(side, c))
            .collect::<Vec<_>>()
    }

    fn value(&self, side: Side, c: &ComparedColumn) -> String {
        match side {
            Side::Source => format!("({})::{}", c.source_expr, c.type_name),
            Side::Target => format!(
                "{}.{}",
                quote_ident(&self.target_alias),
                quote_ident(&c.name)
            ),
        }
    }

    fn key_values(&self, side: Side) -> Vec<String> {
        self.key
            .iter()
            .map(|&k| self.value(side, &self.columns[k]))
            .collect()
    }

    /// The bucket of a row: a hash of its key's text form (seed 1), masked to [`BUCKETS`].
    pub fn bucket_expr(&self, side: Side) -> String {
        format!(
            "(hashtextextended(ROW({})::text, 1) & {})::int4",
            self.key_values(side).join(", "),
            BUCKETS - 1
        )
    }

    /// The 64-bit hash of a row's canonical text (of its key only when `keys_only`).
    pub fn hash_expr(&self, side: Side) -> String {
        let vals = if self.keys_only {
            self.key_values(side)
        } else {
            self.values(side)
        };
        format!("hashtextextended(ROW({})::text, 0)", vals.join(", "))
    }

    fn alias(&self, side: Side) -> String {
        quote_ident(match side {
            Side::Source => &self.source_alias,
            Side::Target => &self.target_alias,
        })
    }

    fn block_range(from: u64, to: u64) -> String {
        format!("ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
    }

    /// Per-bucket (count, xor of row hashes) over the heap blocks `[from, to)` of one leaf
    /// relation (a TID range scan: sequential, no index, one short statement).
    pub fn aggregate_sql(&self, side: Side, leaf_sql: &str, from: u64, to: u64) -> String {
        format!(
            "SELECT b, count(*)::int8, bit_xor(h) FROM (SELECT {} AS b, {} AS h FROM {leaf_sql} AS {} WHERE {}) s GROUP BY b",
            self.bucket_expr(side),
            self.hash_expr(side),
            self.alias(side),
            Self::block_range(from, to)
        )
    }

    /// The key (as text per column) and row hash of the rows of blocks `[from, to)` of one
    /// leaf whose bucket is in `$1` (an `int4[]`).
    pub fn narrow_sql(&self, side: Side, leaf_sql: &str, from: u64, to: u64) -> String {
        let keys: Vec<String> = self
            .key_values(side)
            .into_iter()
            .map(|v| format!("({v})::text"))
            .collect();
        format!(
            "SELECT ARRAY[{}]::text[], {} FROM {leaf_sql} AS {} WHERE {} AND {} = ANY($1::int4[])",
            keys.join(", "),
            self.hash_expr(side),
            self.alias(side),
            Self::block_range(from, to),
            self.bucket_expr(side)
        )
    }

    /// Rows by key: `$1 … $n` are `text[]`, one per key column (the key's text form), zipped
    /// into key tuples. Returns the 1-based position of the key, the row as JSON text and the
    /// row's canonical text (`ROW(…)::text`, the very form the hashes were taken of).
    pub fn lookup_sql(&self, side: Side) -> String {
        let nk = self.key.len();
        let params: Vec<String> = (1..=nk).map(|i| format!("${i}::text[]")).collect();
        let knames: Vec<String> = (0..nk).map(|i| format!("__sm_k{i}")).collect();
        let conds: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let c = &self.columns[k];
                let param = format!("(__sm_keys.{})::{}", knames[i], c.type_name);
                match side {
                    // A plain column compares in its own type against the key's type, which
                    // keeps the source's index usable (cross-type btree operators).
                    Side::Source if c.plain_column => format!(
                        "{}.{} = {param}",
                        self.alias(side),
                        quote_ident(&c.source_expr_column())
                    ),
                    Side::Source => format!("({}) = {param}", self.value(side, c)),
                    Side::Target => format!("{} = {param}", self.value(side, c)),
                }
            })
            .collect();
        let selects: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} AS {}", self.value(side, c), quote_ident(&c.name)))
            .collect();
        let table = match side {
            Side::Source => &self.source_sql,
            Side::Target => &self.target_sql,
        };
        format!(
            "SELECT __sm_keys.__sm_i::int8, to_jsonb(__sm_r)::text, __sm_r::text \
             FROM unnest({}) WITH ORDINALITY AS __sm_keys({}, __sm_i) \
             JOIN LATERAL (SELECT {} FROM {table} AS {} WHERE {}) __sm_r ON true",
            params.join(", "),
            knames.join(", "),
            selects.join(", "),
            self.alias(side),
            conds.join(" AND ")
        )
    }

    /// The names of the key columns.
    pub fn key_names(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&k| self.columns[k].name.clone())
            .collect()
    }

    /// What the comparison covers, as stable text: a saved frontier is reused only when this
    /// is unchanged.
    pub fn fingerprint(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{}={}::{}", c.name, c.source_expr, c.type_name))
            .collect();
        format!(
            "v1;buckets={BUCKETS};keys_only={};{}->{};key={};{}",
            self.keys_only,
            self.source_sql,
            self.target_sql,
            self.key_names().join(","),
            cols.join(";")
        )
    }
}

impl ComparedColumn {
    /// The source column a plain expression names (unquoted).
    fn source_expr_column(&self) -> String {
        plain_column_name(&self.source_expr).unwrap_or_else(|| self.name.clone())
    }
}

/// When `expr` is nothing but one column reference (`col` or `"Col"`), the column's name.
pub fn plain_column_name(expr: &str) -> Option<String> {
    let e = expr.trim();
    if let Some(inner) = e.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        // Every inner quote must be doubled.
        if inner.is_empty() || inner.replace("\"\"", "").contains('"') {
            return None;
        }
        return Some(inner.replace("\"\"", "\""));
    }
    let mut chars = e.chars();
    let first = chars.next()?;
    if !(first == '_' || first.is_ascii_lowercase()) {
        return None;
    }
    if chars.all(|c| c == '_' || c == '$' || c.is_ascii_lowercase() || c.is_ascii_digit()) {
        Some(e.to_string())
    } else {
        None
    }
}

/// Whether a default expression's node tree (`pg_attrdef.adbin::text`) is made of constants
/// only, so evaluating it on the source side gives the value every insert got.
pub fn constant_default_tree(adbin: &str) -> bool {
    const ALLOWED: [&str; 4] = [
        "CONST",
        "RELABELTYPE",
        "COERCETODOMAIN",
        "COERCETODOMAINVALUE",
    ];
    let mut rest = adbin;
    while let Some(p) = rest.find('{') {
        let after = &rest[p + 1..];
        let end = after
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .unwrap_or(after.len());
        let node = &after[..end];
        if !node.is_empty() && !ALLOWED.contains(&node) {
            return false;
        }
        rest = &after[end..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(keys_only: bool) -> Shape {
        Shape {
            source_sql: "\"public\".\"orders\"".into(),
            source_alias: "orders".into(),
            target_sql: "\"public\".\"orders_v2\"".into(),
            target_alias: "orders_v2".into(),
            columns: vec![
                ComparedColumn {
                    name: "customer_id".into(),
                    type_name: "bigint".into(),
                    source_expr: "\"customer_id\"".into(),
                    plain_column: true,
                },
                ComparedColumn {
                    name: "id".into(),
                    type_name: "bigint".into(),
                    source_expr: "\"id\"".into(),
                    plain_column: true,
                },
                ComparedColumn {
                    name: "Amount ✓".into(),
                    type_name: "numeric(12,2)".into(),
                    source_expr: "total / 100.0".into(),
                    plain_column: false,
                },
            ],
            key: vec![0, 1],
            excluded: vec![],
            keys_only,
        }
    }

    #[test]
    fn both_sides_hash_the_same_row_shape() {
        let s = shape(false);
        assert_eq!(
            s.hash_expr(Side::Source),
            "hashtextextended(ROW((\"customer_id\")::bigint, (\"id\")::bigint, (total / 100.0)::numeric(12,2))::text, 0)"
        );
        assert_eq!(
            s.hash_expr(Side::Target),
            "hashtextextended(ROW(\"orders_v2\".\"customer_id\", \"orders_v2\".\"id\", \"orders_v2\".\"Amount ✓\")::text, 0)"
        );
        assert!(s.bucket_expr(Side::Target).contains("& 4095"));
        let k = shape(true);
        assert!(!k.hash_expr(Side::Source).contains("total"));
        assert_ne!(s.fingerprint(), k.fingerprint());
    }

    #[test]
    fn lookup_uses_plain_columns_directly() {
        let s = shape(false);
        let sql = s.lookup_sql(Side::Source);
        assert!(
            sql.contains("\"orders\".\"customer_id\" = (__sm_keys.__sm_k0)::bigint"),
            "{sql}"
        );
        assert!(sql.contains("unnest($1::text[], $2::text[])"), "{sql}");
        let t = s.lookup_sql(Side::Target);
        assert!(
            t.contains("\"orders_v2\".\"id\" = (__sm_keys.__sm_k1)::bigint"),
            "{t}"
        );
    }

    #[test]
    fn plain_column_names() {
        assert_eq!(plain_column_name("id"), Some("id".into()));
        assert_eq!(
            plain_column_name(" \"A \"\"b\"\"\" "),
            Some("A \"b\"".into())
        );
        assert_eq!(plain_column_name("Id"), None);
        assert_eq!(plain_column_name("a + 1"), None);
        assert_eq!(plain_column_name("\"a\" || \"b\""), None);
        assert_eq!(plain_column_name("1a"), None);
    }

    #[test]
    fn constant_defaults_only() {
        assert!(constant_default_tree(
            "{CONST :consttype 25 :consttypmod -1 :constvalue 7 [ 28 0 0 0 85 83 68 ]}"
        ));
        assert!(!constant_default_tree(
            "{FUNCEXPR :funcid 1299 :funcresulttype 1184 :args <>}"
        ));
        assert!(!constant_default_tree("{NEXTVALEXPR :seqid 16384}"));
        assert!(!constant_default_tree("{SQLVALUEFUNCTION :op 3}"));
    }
}
