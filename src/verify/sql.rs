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
    /// Its type's oid.
    pub type_oid: u32,
    /// The SQL over source columns that yields it.
    pub source_expr: String,
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

/// Built-in types whose values are equal exactly when their text forms are (with `TimeZone`
/// pinned), so their binary hash (`hash_record_extended`, no text output: 2× cheaper) is as
/// exact as hashing their text: bool, bytea, "char", name, int8, int2, int4, text, oid, varchar,
/// date, time, timestamp, timestamptz, uuid. Not numeric (1.0 = 1.00), float (0 = -0), interval
/// ('1 day' = '24 hours'), jsonb (numbers inside), bpchar, json, point…: those hash their text.
pub const EXACT_HASH_TYPES: [u32; 15] = [
    16, 17, 18, 19, 20, 21, 23, 25, 26, 1043, 1082, 1083, 1114, 1184, 2950,
];

/// Collatable types among [`EXACT_HASH_TYPES`]: hashed under `COLLATE "C"` (bytewise), since a
/// nondeterministic column collation would hash 'A' and 'a' alike.
const COLLATABLE: [u32; 3] = [19, 25, 1043];

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

    /// A value as it enters a hash: itself for [`EXACT_HASH_TYPES`], else its text form.
    fn hashed(&self, side: Side, c: &ComparedColumn) -> String {
        let v = self.value(side, c);
        if COLLATABLE.contains(&c.type_oid) {
            format!("({v}) COLLATE \"C\"")
        } else if EXACT_HASH_TYPES.contains(&c.type_oid) {
            v
        } else {
            format!("(({v})::text) COLLATE \"C\"")
        }
    }

    fn hashed_key(&self, side: Side) -> Vec<String> {
        self.key
            .iter()
            .map(|&k| self.hashed(side, &self.columns[k]))
            .collect()
    }

    /// The bucket of a row: a hash of its key (seed 1), masked to [`BUCKETS`]. Both sides
    /// hash values of the same (target) types, so a key lands in the same bucket on each.
    pub fn bucket_expr(&self, side: Side) -> String {
        format!(
            "(hash_record_extended(ROW({}), 1) & {})::int4",
            self.hashed_key(side).join(", "),
            BUCKETS - 1
        )
    }

    /// The 64-bit hash of a row's canonical form (of its key only when `keys_only`).
    pub fn hash_expr(&self, side: Side) -> String {
        let vals = if self.keys_only {
            self.hashed_key(side)
        } else {
            self.columns.iter().map(|c| self.hashed(side, c)).collect()
        };
        format!("hash_record_extended(ROW({}), 0)", vals.join(", "))
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
    ///
    /// A plain join, not a lateral lookup per key: the subquery is pulled up, so when the key
    /// is plain columns of the same types the planner probes the table's index per key, and
    /// when it is computed it hash-joins one scan instead of scanning once per key.
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
                format!(
                    "__sm_r.{} = (__sm_keys.{})::{}",
                    quote_ident(&c.name),
                    knames[i],
                    c.type_name
                )
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
             JOIN (SELECT {} FROM {table} AS {}) __sm_r ON {}",
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
            "v3;buckets={BUCKETS};keys_only={};{}->{};key={};{}",
            self.keys_only,
            self.source_sql,
            self.target_sql,
            self.key_names().join(","),
            cols.join(";")
        )
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
                    type_oid: 20,
                    source_expr: "\"customer_id\"".into(),
                },
                ComparedColumn {
                    name: "id".into(),
                    type_name: "bigint".into(),
                    type_oid: 20,
                    source_expr: "\"id\"".into(),
                },
                ComparedColumn {
                    name: "Amount ✓".into(),
                    type_name: "numeric(12,2)".into(),
                    type_oid: 1700,
                    source_expr: "total / 100.0".into(),
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
            "hash_record_extended(ROW((\"customer_id\")::bigint, (\"id\")::bigint, (((total / 100.0)::numeric(12,2))::text) COLLATE \"C\"), 0)"
        );
        assert_eq!(
            s.hash_expr(Side::Target),
            "hash_record_extended(ROW(\"orders_v2\".\"customer_id\", \"orders_v2\".\"id\", ((\"orders_v2\".\"Amount ✓\")::text) COLLATE \"C\"), 0)"
        );
        assert_eq!(
            s.bucket_expr(Side::Source),
            "(hash_record_extended(ROW((\"customer_id\")::bigint, (\"id\")::bigint), 1) & 4095)::int4"
        );
        let k = shape(true);
        assert!(!k.hash_expr(Side::Source).contains("total"));
        assert_ne!(s.fingerprint(), k.fingerprint());
    }

    #[test]
    fn lookup_joins_on_the_compared_key() {
        let s = shape(false);
        let sql = s.lookup_sql(Side::Source);
        assert!(
            sql.contains("__sm_r.\"customer_id\" = (__sm_keys.__sm_k0)::bigint"),
            "{sql}"
        );
        assert!(sql.contains("unnest($1::text[], $2::text[])"), "{sql}");
        let t = s.lookup_sql(Side::Target);
        assert!(
            t.contains("__sm_r.\"id\" = (__sm_keys.__sm_k1)::bigint"),
            "{t}"
        );
        assert!(
            t.contains("FROM \"public\".\"orders_v2\" AS \"orders_v2\""),
            "{t}"
        );
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
