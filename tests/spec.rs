//! The spec file contract, without a server: a good spec, its defaults, a clear message for
//! every bad field, table-name parsing, the control-token rule, and passwords never shown.

use shadowmig::spec::{QualifiedName, Spec, SpecError};

const GOOD: &str = r#"
name = "orders_by_customer"
[source]
url = "postgres://app:hunter2xyz@db.example.com:5433/shop"
table = "public.orders"
[target]
table = "orders_v2"
create = "CREATE TABLE public.orders_v2 (id bigint PRIMARY KEY)"
[transform]
total_amount_minor = "total_amount::bigint"
[reverse]
total_amount = "total_amount_minor::integer"
"#;

const PW: &str = "hunter2xyz";

fn err(text: &str) -> String {
    let e = Spec::parse(text, "migration.toml").expect_err("spec should be rejected");
    let s = e.to_string();
    assert!(!s.contains(PW), "password leaked: {s}");
    assert!(
        !format!("{e:?}").contains(PW),
        "password leaked in Debug: {e:?}"
    );
    s
}

/// GOOD with `line` added at the end of section `[section]` (or replacing `old` with `new`).
fn with(old: &str, new: &str) -> String {
    assert!(GOOD.contains(old), "{old}");
    GOOD.replacen(old, new, 1)
}

#[test]
fn good_spec_and_defaults() {
    let s = Spec::parse(GOOD, "migration.toml").unwrap();
    assert_eq!(s.name, "orders_by_customer");
    assert_eq!(s.source.table, QualifiedName::new("public", "orders"));
    assert_eq!(s.target.table, QualifiedName::new("public", "orders_v2"));
    assert!(s.same_database(), "target url defaults to the source's");
    assert_eq!(
        s.target.url.redacted(),
        "postgres://app:***@db.example.com:5433/shop"
    );
    assert_eq!(s.transform["total_amount_minor"], "total_amount::bigint");
    assert_eq!(s.reverse["total_amount"], "total_amount_minor::integer");
    assert_eq!(s.copy.chunk_rows, 10_000);
    assert_eq!(s.copy.workers, 2);
    assert!(!s.copy.defer_indexes, "off by default");
    assert_eq!(s.throttle.max_lag_bytes, 1 << 30);
    assert_eq!(s.throttle.max_apply_lag_ms, 30_000);
    assert_eq!(s.throttle.max_replica_lag_bytes, None);
    assert_eq!(s.throttle.lock_timeout_ms, 5_000);
    assert_eq!(s.control.listen.to_string(), "127.0.0.1:7878");
    assert!(s.control.token.is_none());
    assert_eq!(s.metrics.listen.to_string(), "127.0.0.1:9187");
    assert_eq!(s.proxy.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(s.slot_name(), "shadowmig_orders_by_customer");
}

#[test]
fn every_field_can_be_set() {
    let text = format!(
        "{GOOD}
[copy]
chunk_rows = 500
workers = 4
defer_indexes = true
[throttle]
max_lag_bytes = 1000
max_apply_lag_ms = 200
max_replica_lag_bytes = 3000
max_rows_per_sec = 50000
lock_timeout_ms = 1500
[control]
listen = \"0.0.0.0:7000\"
token = \"tok-abc-123\"
[metrics]
listen = \"127.0.0.1:9999\"
[proxy]
listen = \"[::1]:6000\"
"
    );
    let s = Spec::parse(&text, "m.toml").unwrap();
    assert_eq!((s.copy.chunk_rows, s.copy.workers), (500, 4));
    assert!(s.copy.defer_indexes);
    assert_eq!(s.throttle.max_replica_lag_bytes, Some(3000));
    assert_eq!(s.throttle.max_rows_per_sec, Some(50_000));
    assert_eq!(s.throttle.lock_timeout_ms, 1500);
    assert_eq!(s.control.token.as_ref().unwrap().expose(), "tok-abc-123");
    assert_eq!(s.proxy.listen.to_string(), "[::1]:6000");
    let dbg = format!("{s:?}");
    assert!(!dbg.contains("tok-abc-123"), "token in Debug: {dbg}");
    assert!(!dbg.contains(PW), "password in Debug: {dbg}");
}

#[test]
fn the_fixture_parses() {
    let s = Spec::parse(
        include_str!("../fixtures/specs/orders.toml"),
        "fixtures/specs/orders.toml",
    )
    .unwrap();
    assert_eq!(s.target.table.name, "orders_v2");
    assert!(s
        .target
        .create
        .as_deref()
        .unwrap()
        .contains("PARTITION BY HASH (customer_id)"));
}

#[test]
fn bad_numbers_name_the_field() {
    let e = err(&format!("{GOOD}\n[copy]\nchunk_rows = -5\n"));
    assert_eq!(
        e,
        "spec migration.toml: [copy].chunk_rows: expected a positive integer, got -5"
    );
    let e = err(&format!("{GOOD}\n[copy]\ndefer_indexes = \"yes\"\n"));
    assert_eq!(
        e,
        "spec migration.toml: [copy].defer_indexes: expected true or false, got \"yes\""
    );
    let e = err(&format!("{GOOD}\n[copy]\nworkers = \"two\"\n"));
    assert_eq!(
        e,
        "spec migration.toml: [copy].workers: expected a positive integer, got \"two\""
    );
    let e = err(&format!("{GOOD}\n[copy]\nworkers = 1000\n"));
    assert!(
        e.contains("[copy].workers: expected a positive integer at most 64, got 1000"),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[throttle]\nmax_lag_bytes = 0\n"));
    assert!(
        e.contains("[throttle].max_lag_bytes: expected a positive integer, got 0"),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[throttle]\nmax_apply_lag_ms = 1.5\n"));
    assert!(
        e.contains("[throttle].max_apply_lag_ms: expected a positive integer, got 1.5"),
        "{e}"
    );
}

#[test]
fn bad_name_says_what_is_allowed() {
    let e = err(&with("\"orders_by_customer\"", "\"Orders-By-Customer\""));
    assert!(
        e.starts_with(
            "spec migration.toml: name: expected only lowercase letters, digits and underscore"
        ),
        "{e}"
    );
    let long = "a".repeat(41);
    let e = err(&with("\"orders_by_customer\"", &format!("\"{long}\"")));
    assert!(e.contains("name: expected at most 40 characters"), "{e}");
    let e = err(&with("name = \"orders_by_customer\"\n", ""));
    assert!(e.contains("name: missing; expected a migration id"), "{e}");
    let e = err(&with("\"orders_by_customer\"", "7"));
    assert!(e.contains("name: expected a migration id"), "{e}");
}

#[test]
fn unknown_fields_are_rejected_with_line_and_table() {
    let e = err(&format!("{GOOD}\n[copy]\nchunk_row = 5\n"));
    assert!(e.starts_with("spec migration.toml: line "), "{e}");
    assert!(e.contains("in [copy]"), "{e}");
    assert!(
        e.contains(
            "unknown field `chunk_row`, expected one of `chunk_rows`, `workers`, `defer_indexes`"
        ),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[copyy]\nchunk_rows = 5\n"));
    assert!(e.contains("unknown field `copyy`"), "{e}");
    let e = err(&with(
        "table = \"public.orders\"",
        "table = \"public.orders\"\nschema = \"x\"",
    ));
    assert!(
        e.contains("unknown field `schema`") && e.contains("in [source]"),
        "{e}"
    );
}

#[test]
fn missing_sections_and_fields() {
    let e = err("name = \"x\"\n[target]\ntable = \"t\"\n");
    assert_eq!(
        e,
        "spec migration.toml: [source]: missing; expected a table with `url` and `table`"
    );
    let e = err(&with("table = \"public.orders\"\n", ""));
    assert!(
        e.contains("[source].table: missing; expected a table name"),
        "{e}"
    );
    let e = err(&with("table = \"orders_v2\"", "table = 5"));
    assert!(
        e.contains("[target].table: expected a table name like `schema.table` or `table`, got 5"),
        "{e}"
    );
}

#[test]
fn bad_table_names() {
    for (bad, want) in [
        ("a.b.c", "got 3 dot-separated parts"),
        ("public.", "empty name part"),
        ("my table", "not allowed in an unquoted identifier"),
        ("\"unterminated", "unterminated quoted identifier"),
        ("\"\"", "cannot be empty"),
        ("\"a\"x", "after a quoted identifier"),
        ("", "empty name"),
    ] {
        let text = with("table = \"orders_v2\"", &format!("table = '{bad}'"));
        let e = err(&text);
        assert!(
            e.contains("[target].table: ") && e.contains(want),
            "{bad}: {e}"
        );
    }
    let long = "x".repeat(64);
    assert!(QualifiedName::parse(&long)
        .unwrap_err()
        .to_string()
        .contains("at most 63"));
}

#[test]
fn table_name_parsing_and_quoting() {
    let n = QualifiedName::parse("Orders").unwrap();
    assert_eq!(
        n,
        QualifiedName::new("public", "orders"),
        "unquoted names fold to lower case"
    );
    let n = QualifiedName::parse(r#""My Schema"."Orders ✓""#).unwrap();
    assert_eq!(n, QualifiedName::new("My Schema", "Orders ✓"));
    let n = QualifiedName::parse(r#""Shop ""EU"""."Orders ✓""#).unwrap();
    assert_eq!(n.schema, "Shop \"EU\"");
    assert_eq!(n.quoted(), r#""Shop ""EU"""."Orders ✓""#);
    assert_eq!(QualifiedName::parse(&n.quoted()).unwrap(), n);
    let n = QualifiedName::parse(" sales.\"Q1.2024\" ").unwrap();
    assert_eq!(n, QualifiedName::new("sales", "Q1.2024"));
}

#[test]
fn same_table_in_same_database_is_rejected() {
    let e = err(&with("table = \"orders_v2\"", "table = \"orders\""));
    assert!(
        e.contains("[target].table: must differ from [source].table"),
        "{e}"
    );
}

#[test]
fn control_off_loopback_needs_a_token() {
    let e = err(&format!("{GOOD}\n[control]\nlisten = \"0.0.0.0:7878\"\n"));
    assert!(
        e.contains("[control].token: required when [control].listen is not a loopback address"),
        "{e}"
    );
    let e = err(&format!(
        "{GOOD}\n[control]\nlisten = \"10.0.0.5:7878\"\ntoken = \"\"\n"
    ));
    assert!(
        e.contains("[control].token: expected a non-empty string"),
        "{e}"
    );
    assert!(Spec::parse(
        &format!("{GOOD}\n[control]\nlisten = \"[::1]:7878\"\n"),
        "m"
    )
    .is_ok());
    let e = err(&format!("{GOOD}\n[control]\nlisten = \"localhost:7878\"\n"));
    assert!(
        e.contains("[control].listen: expected an address like 127.0.0.1:7878"),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[metrics]\nlisten = \"nope\"\n"));
    assert!(e.contains("[metrics].listen:"), "{e}");
}

#[test]
fn create_must_not_end_the_transaction() {
    let e = err(&with(
        "(id bigint PRIMARY KEY)\"",
        "(id bigint PRIMARY KEY); COMMIT\"",
    ));
    assert!(
        e.contains("[target].create: must not contain transaction control (COMMIT)"),
        "{e}"
    );
    let e = err(&with(
        "create = \"CREATE TABLE public.orders_v2 (id bigint PRIMARY KEY)\"",
        "create = \"  \"",
    ));
    assert!(e.contains("[target].create: expected SQL"), "{e}");
}

#[test]
fn transform_values_must_be_sql_strings() {
    let e = err(&with("\"total_amount::bigint\"", "5"));
    assert!(
        e.contains("[transform].total_amount_minor: expected an SQL expression (a string), got 5"),
        "{e}"
    );
    let e = err(&with("\"total_amount_minor::integer\"", "\"\""));
    assert!(
        e.contains("[reverse].total_amount: expected an SQL expression, got an empty string"),
        "{e}"
    );
    let s = Spec::parse(
        &with(
            "[transform]",
            "[transform]\n\"Betrag Minor\" = '\"Betrag\"::bigint'",
        ),
        "m",
    )
    .unwrap();
    assert_eq!(s.transform["Betrag Minor"], "\"Betrag\"::bigint");
}

#[test]
fn passwords_never_shown() {
    let s = Spec::parse(GOOD, "m").unwrap();
    for shown in [
        s.source.url.to_string(),
        format!("{:?}", s.source.url),
        format!("{s:?}"),
        s.source.url.redacted(),
    ] {
        assert!(!shown.contains(PW), "{shown}");
    }
    // A malformed URL: the error names the field, not the password.
    let e = err(&with(
        "postgres://app:hunter2xyz@db.example.com:5433/shop",
        "postgres://app:hunter2xyz@db.example.com:notaport/shop",
    ));
    assert!(
        e.contains("[source].url: not a valid PostgreSQL connection URL"),
        "{e}"
    );
    let e = err(&with(
        "postgres://app:hunter2xyz@db.example.com:5433/shop",
        "host=db password=hunter2xyz bogus=1",
    ));
    assert!(
        e.contains("[source].url: not a valid PostgreSQL connection URL"),
        "{e}"
    );
    // A URL where a table belongs: serde's own message would quote it.
    let e = err(&with(
        "[target]\n",
        "[target]\nurl = { x = \"postgres://app:hunter2xyz@h/db\" }\n",
    ));
    assert!(e.contains("[target].url: expected a connection URL"), "{e}");
    let e = err(&with(
        "url = \"postgres://app:hunter2xyz@db.example.com:5433/shop\"",
        "url = \"postgres://app:hunter2xyz@db.example.com:5433/shop\" trailing",
    ));
    assert!(e.contains("line 4"), "{e}");
    let e = err(&format!("source = \"postgres://app:{PW}@h/db\"\n{GOOD}"));
    assert!(
        e.contains("postgres://app:***@h/db") || e.contains("source"),
        "{e}"
    );
    // The token never shows in errors about it.
    let e = err(&format!("{GOOD}\n[control]\ntoken = 12345678\n"));
    assert!(
        e.contains("[control].token: expected a string") && !e.contains("12345678"),
        "{e}"
    );
}

#[test]
fn read_errors_name_the_file() {
    let e = Spec::load(std::path::Path::new("/nonexistent/x.toml")).unwrap_err();
    assert!(matches!(e, SpecError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with("spec /nonexistent/x.toml: cannot read:"),
        "{e}"
    );
}

#[test]
fn syntax_errors_near_unicode_do_not_panic() {
    let e = err("name = \"✓✓\" ✓ oops\n");
    assert!(e.starts_with("spec migration.toml: line 1"), "{e}");
    let e = err(&format!("{GOOD}\n[transform]\n\"Betrag ✓\" = \n"));
    assert!(e.contains("line "), "{e}");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
}

#[test]
fn verify_section_defaults_values_and_errors() {
    let s = Spec::parse(GOOD, "migration.toml").unwrap();
    assert_eq!(s.verify.sample_rate, 0.01);
    assert_eq!(s.verify.random_keys_per_minute, 60);
    let s = Spec::parse(
        &format!("{GOOD}[verify]\nsample_rate = 1\nrandom_keys_per_minute = 0\n"),
        "migration.toml",
    )
    .unwrap();
    assert_eq!(s.verify.sample_rate, 1.0);
    assert_eq!(s.verify.random_keys_per_minute, 0);
    let e = err(&format!("{GOOD}[verify]\nsample_rate = 1.5\n"));
    assert!(
        e.contains("[verify].sample_rate") && e.contains("1.5"),
        "{e}"
    );
    let e = err(&format!("{GOOD}[verify]\nsample_rate = \"all\"\n"));
    assert!(e.contains("[verify].sample_rate"), "{e}");
    let e = err(&format!("{GOOD}[verify]\nrandom_keys_per_minute = -3\n"));
    assert!(e.contains("[verify].random_keys_per_minute"), "{e}");
    let e = err(&format!("{GOOD}[verify]\nsample_rat = 0.5\n"));
    assert!(e.contains("sample_rat"), "{e}");
}
