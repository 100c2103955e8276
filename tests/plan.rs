//! `shadowmig plan` against real PostgreSQL: the seed guide's orders change, each failing check
//! with its fix, quoted and unicode names, two databases, and the binary's exit codes and
//! silence about passwords. Plan must leave nothing behind.

use std::process::Command;

use shadowmig::plan::{self, names, Plan, Status};
use shadowmig::spec::Spec;
use shadowmig::testpg::{self, ClusterConfig, TestCluster};

const ORDERS_FIXTURE: &str = include_str!("../fixtures/specs/orders.toml");

const ORDERS_SCHEMA: &str = "
CREATE TABLE public.customers (id bigint PRIMARY KEY, name text);
CREATE TABLE public.orders (
    id           bigserial PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES public.customers(id),
    total_amount integer,
    status       text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.order_lines (
    id       bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES public.orders(id),
    sku      text
);
INSERT INTO public.customers SELECT g, 'c' || g FROM generate_series(1, 10) g;
INSERT INTO public.orders (customer_id, total_amount, status)
    SELECT 1 + g % 10, g * 100, 'new' FROM generate_series(1, 500) g;
";

/// The fixture with its URL pointed at `url`.
fn orders_spec_text(url: &str) -> String {
    ORDERS_FIXTURE.replace("postgres://app@127.0.0.1:5432/shop", url)
}

fn parse(text: &str) -> Spec {
    Spec::parse(text, "test.toml").unwrap()
}

fn run_plan(spec: &Spec) -> Plan {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(plan::plan(spec)).unwrap()
}

fn status(p: &Plan, name: &str) -> Status {
    p.check(name)
        .unwrap_or_else(|| panic!("no check {name}:\n{}", p.render()))
        .status
}

/// Everything plan could leave behind, as one comparable string.
fn footprint(c: &TestCluster, db: &str) -> String {
    c.psql(
        db,
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()) || '|' ||
                (SELECT count(*) FROM pg_publication) || '|' ||
                (SELECT string_agg(nspname, ',' ORDER BY nspname) FROM pg_namespace) || '|' ||
                (SELECT string_agg(oid::regclass::text || ':' || relreplident::text, ',' ORDER BY oid)
                   FROM pg_class WHERE relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
                   AND relkind IN ('r','p','i','I','S','v'))",
    )
    .unwrap()
}

/// The statements of the first option of a replica-identity fix, in order.
fn index_fix_statements(fix: &str) -> Vec<String> {
    let first = fix.split("\nor\n").next().unwrap();
    first
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CREATE ") || l.starts_with("ALTER "))
        .map(|l| l.split("  (").next().unwrap().to_string())
        .collect()
}

#[test]
fn orders_fails_on_replica_identity_then_passes_after_the_suggested_fix() {
    let (c, db) = testpg::fresh_db("plan_orders").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    let spec = parse(&orders_spec_text(&c.url(&db)));
    let before = footprint(c, &db);

    let p = run_plan(&spec);
    let text = p.render();
    assert!(!p.ok(), "{text}");
    let ri = p.check(names::REPLICA_IDENTITY).unwrap();
    assert_eq!(ri.status, Status::Fail, "{text}");
    assert!(ri.detail.contains("customer_id"), "{text}");
    let fix = ri.fix.as_deref().unwrap();
    assert!(
        fix.contains(r#"CREATE UNIQUE INDEX CONCURRENTLY "shadowmig_orders_by_customer_ri" ON "public"."orders" ("id", "customer_id");"#),
        "{fix}"
    );
    assert!(
        fix.contains(r#"ALTER TABLE "public"."orders" REPLICA IDENTITY FULL;"#),
        "{fix}"
    );
    // Only the identity check fails; the rest of the orders change is sound.
    for ch in &p.checks {
        if ch.name != names::REPLICA_IDENTITY {
            assert_ne!(
                ch.status,
                Status::Fail,
                "{}: {}\n{text}",
                ch.name,
                ch.detail
            );
            assert_ne!(
                ch.status,
                Status::Skipped,
                "{}: {}\n{text}",
                ch.name,
                ch.detail
            );
        }
    }
    assert_eq!(status(&p, names::TARGET_KEY), Status::Ok);
    assert!(
        p.check(names::TARGET_KEY)
            .unwrap()
            .detail
            .contains("(customer_id, id), partitioned by hash (customer_id) into 4 partition(s)"),
        "{text}"
    );
    // Foreign keys both ways are listed with what they mean.
    let fk = p.check(names::FOREIGN_KEYS).unwrap();
    assert_eq!(fk.status, Status::Warn);
    assert!(fk.detail.contains(r#"out: "orders_customer_id_fkey" "public"."orders"(customer_id) → "public"."customers"(id)"#), "{}", fk.detail);
    assert!(fk.detail.contains(r#"in: "order_lines_order_id_fkey" "public"."order_lines"(order_id) → "public"."orders"(id)"#), "{}", fk.detail);
    assert!(
        fk.detail.contains("no unique constraint on (id) alone"),
        "{}",
        fk.detail
    );
    assert_eq!(status(&p, names::DISK), Status::Ok, "{text}");
    assert!(text.contains("✘ replica identity"), "{text}");
    assert!(text.contains("Runbook"), "{text}");
    assert!(
        text.contains(
            r#"CREATE PUBLICATION "shadowmig_orders_by_customer" FOR TABLE "public"."orders""#
        ),
        "{text}"
    );
    assert_eq!(p.steps.len(), 10);
    assert!(p
        .steps
        .iter()
        .all(|s| !s.locks.is_empty() && !s.rollback.is_empty()));

    // Plan changed nothing: no slot, publication, schema, table, index or identity change.
    assert_eq!(footprint(c, &db), before);
    assert_eq!(
        c.psql(&db, "SELECT to_regclass('public.orders_v2') IS NULL")
            .unwrap(),
        "t"
    );

    // Apply the fix exactly as suggested (CONCURRENTLY cannot share a transaction).
    let stmts = index_fix_statements(fix);
    assert_eq!(stmts.len(), 2, "{stmts:?}");
    for s in &stmts {
        c.psql(&db, s).unwrap();
    }
    let p2 = run_plan(&spec);
    assert!(p2.ok(), "{}", p2.render());
    assert_eq!(status(&p2, names::REPLICA_IDENTITY), Status::Ok);
    let s2 = p2.check(names::SOURCE_KEY).unwrap();
    assert!(
        s2.detail
            .contains("USING INDEX \"shadowmig_orders_by_customer_ri\""),
        "{}",
        s2.detail
    );
}

#[test]
fn full_identity_passes_and_existing_covering_index_is_offered() {
    let (c, db) = testpg::fresh_db("plan_full").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    c.psql(
        &db,
        "CREATE UNIQUE INDEX orders_cust_id ON public.orders (customer_id, id)",
    )
    .unwrap();
    let spec = parse(&orders_spec_text(&c.url(&db)));
    let p = run_plan(&spec);
    let fix = p
        .check(names::REPLICA_IDENTITY)
        .unwrap()
        .fix
        .clone()
        .unwrap();
    assert!(
        fix.contains(r#"REPLICA IDENTITY USING INDEX "orders_cust_id""#),
        "{fix}"
    );
    assert!(
        !fix.contains("CREATE UNIQUE INDEX"),
        "an existing index covers it: {fix}"
    );

    c.psql(&db, "ALTER TABLE public.orders REPLICA IDENTITY FULL")
        .unwrap();
    let p = run_plan(&spec);
    assert!(p.ok(), "{}", p.render());
    assert!(p
        .check(names::REPLICA_IDENTITY)
        .unwrap()
        .detail
        .starts_with("FULL"));
}

#[test]
fn missing_source_table_fails_and_skips_what_depends_on_it() {
    let (c, db) = testpg::fresh_db("plan_missing").unwrap();
    let spec = parse(&orders_spec_text(&c.url(&db)));
    let p = run_plan(&spec);
    assert!(!p.ok());
    let st = p.check(names::SOURCE_TABLE).unwrap();
    assert_eq!(st.status, Status::Fail);
    assert!(
        st.detail.contains(r#""public"."orders" does not exist"#),
        "{}",
        st.detail
    );
    assert!(st.fix.is_some());
    assert_eq!(status(&p, names::SOURCE_KEY), Status::Skipped);
    assert_eq!(status(&p, names::COLUMNS), Status::Skipped);
    // The target DDL is still checked on its own.
    assert_eq!(
        status(&p, names::TARGET_TABLE),
        Status::Ok,
        "{}",
        p.render()
    );
}

#[test]
fn wal_level_replica_fails_with_the_fix() {
    let c = TestCluster::start(&ClusterConfig::default().setting("wal_level", "replica")).unwrap();
    let db = c.create_database("plan_wal").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    c.psql(&db, "ALTER TABLE public.orders REPLICA IDENTITY FULL")
        .unwrap();
    let spec = parse(&orders_spec_text(&c.url(&db)));
    let p = run_plan(&spec);
    assert!(!p.ok());
    let w = p.check(names::WAL_LEVEL).unwrap();
    assert_eq!(w.status, Status::Fail, "{}", p.render());
    assert!(w.detail.contains("\"replica\""), "{}", w.detail);
    assert!(w
        .fix
        .as_deref()
        .unwrap()
        .contains("ALTER SYSTEM SET wal_level = logical"));
    // Nothing else is wrong with this setup.
    let failed: Vec<&str> = p
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(failed, vec![names::WAL_LEVEL]);
    // The target is the same server: the reverse stream cannot work either.
    let r = p.check(names::REVERSE).unwrap();
    assert_eq!(r.status, Status::Warn);
    assert!(
        r.detail.contains("wal_level is \"replica\""),
        "{}",
        r.detail
    );
}

#[test]
fn bad_target_ddl_fails_with_the_server_message() {
    let (c, db) = testpg::fresh_db("plan_ddl").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    let text = orders_spec_text(&c.url(&db)).replace(
        "currency           text        NOT NULL DEFAULT 'USD',",
        "currency           textt       NOT NULL DEFAULT 'USD',",
    );
    let p = run_plan(&parse(&text));
    let t = p.check(names::TARGET_TABLE).unwrap();
    assert_eq!(t.status, Status::Fail);
    assert!(
        t.detail.contains(r#"type "textt" does not exist"#),
        "{}",
        t.detail
    );
    assert_eq!(status(&p, names::TARGET_KEY), Status::Skipped);
    assert_eq!(
        c.psql(&db, "SELECT to_regclass('public.orders_v2') IS NULL")
            .unwrap(),
        "t"
    );
}

#[test]
fn partitioned_target_without_partitions_fails() {
    let (c, db) = testpg::fresh_db("plan_noparts").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    let text: String = orders_spec_text(&c.url(&db))
        .lines()
        .filter(|l| !l.contains("PARTITION OF"))
        .collect::<Vec<_>>()
        .join("\n");
    let p = run_plan(&parse(&text));
    let k = p.check(names::TARGET_KEY).unwrap();
    assert_eq!(k.status, Status::Fail, "{}", p.render());
    assert!(k.detail.contains("no partitions"), "{}", k.detail);
    assert!(k
        .fix
        .as_deref()
        .unwrap()
        .contains("FOR VALUES WITH (MODULUS 4, REMAINDER 0)"));
}

#[test]
fn uncovered_target_column_is_named() {
    let (c, db) = testpg::fresh_db("plan_cover").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    let text = orders_spec_text(&c.url(&db)).replace(
        "    status             text,\n",
        "    status             text,\n    fx_rate            numeric NOT NULL,\n",
    );
    let p = run_plan(&parse(&text));
    let col = p.check(names::COLUMNS).unwrap();
    assert_eq!(col.status, Status::Fail, "{}", p.render());
    assert!(
        col.detail
            .contains(r#"target column "fx_rate" (numeric) is NOT NULL without a default"#),
        "{}",
        col.detail
    );
    assert!(col.fix.as_deref().unwrap().contains("[transform].fx_rate"));
}

#[test]
fn transform_type_errors_and_unknown_names_fail() {
    let (c, db) = testpg::fresh_db("plan_types").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    let base = orders_spec_text(&c.url(&db));
    // text into bigint: no assignment cast.
    let p = run_plan(&parse(&base.replace(
        r#"total_amount_minor = "total_amount::bigint""#,
        r#"total_amount_minor = "status""#,
    )));
    let t = p.check(names::TRANSFORMS).unwrap();
    assert_eq!(t.status, Status::Fail, "{}", p.render());
    assert!(
        t.detail.contains("[transform].total_amount_minor"),
        "{}",
        t.detail
    );
    assert!(
        t.detail
            .contains("is of type bigint but expression is of type text"),
        "{}",
        t.detail
    );
    // A column the source does not have.
    let p = run_plan(&parse(&base.replace(
        r#"total_amount_minor = "total_amount::bigint""#,
        r#"total_amount_minor = "amount_cents::bigint""#,
    )));
    let t = p.check(names::TRANSFORMS).unwrap();
    assert_eq!(t.status, Status::Fail);
    assert!(
        t.detail.contains(r#"column "amount_cents" does not exist"#),
        "{}",
        t.detail
    );
    // A transform into a column the target does not have, and a reverse for no source column.
    let p = run_plan(&parse(
        &base
            .replace("[transform]", "[transform]\nnope = \"1\"")
            .replace("[reverse]", "[reverse]\nalso_nope = \"1\""),
    ));
    let col = p.check(names::COLUMNS).unwrap();
    assert_eq!(col.status, Status::Fail);
    assert!(
        col.detail
            .contains("[transform].nope names no column of the target"),
        "{}",
        col.detail
    );
    assert!(
        col.detail
            .contains("[reverse].also_nope names no column of the source"),
        "{}",
        col.detail
    );
}

#[test]
fn quoted_unicode_names_work_end_to_end() {
    let (c, db) = testpg::fresh_db("plan_unicode").unwrap();
    c.psql(
        &db,
        r#"CREATE SCHEMA "Shop ""EU""";
           CREATE TABLE "Shop ""EU"""."Orders ✓" (
               "Order Id" bigint PRIMARY KEY,
               "Kunde ✓"  bigint NOT NULL,
               "Betrag"   integer
           );
           INSERT INTO "Shop ""EU"""."Orders ✓" VALUES (1, 7, 100), (2, 8, 250);"#,
    )
    .unwrap();
    let spec_text = format!(
        r#"name = "unicode_orders"
[source]
url = "{}"
table = '"Shop ""EU"""."Orders ✓"'
[target]
table = '"Shop ""EU"""."Orders v2 ✓"'
create = '''
CREATE TABLE "Shop ""EU"""."Orders v2 ✓" (
    "Order Id" bigint NOT NULL,
    "Kunde ✓" bigint NOT NULL,
    "Betrag Minor" bigint,
    PRIMARY KEY ("Kunde ✓", "Order Id"))
'''
[transform]
"Betrag Minor" = '"Betrag"::bigint'
"#,
        c.url(&db)
    );
    let spec = parse(&spec_text);
    assert_eq!(spec.source.table.schema, "Shop \"EU\"");
    let before = footprint(c, &db);
    let p = run_plan(&spec);
    let text = p.render();
    for n in [
        names::SOURCE_TABLE,
        names::TARGET_TABLE,
        names::TARGET_KEY,
        names::COLUMNS,
        names::TRANSFORMS,
    ] {
        assert_eq!(status(&p, n), Status::Ok, "{n}\n{text}");
    }
    let ri = p.check(names::REPLICA_IDENTITY).unwrap();
    assert_eq!(ri.status, Status::Fail, "{text}");
    let fix = ri.fix.clone().unwrap();
    assert!(
        fix.contains(r#"ON "Shop ""EU"""."Orders ✓" ("Order Id", "Kunde ✓");"#),
        "{fix}"
    );
    assert_eq!(footprint(c, &db), before);
    for s in index_fix_statements(&fix) {
        c.psql(&db, &s).unwrap();
    }
    let p = run_plan(&spec);
    assert!(p.ok(), "{}", p.render());
}

#[test]
fn two_databases_type_check_across_them() {
    let (c, src_db) = testpg::fresh_db("plan_src").unwrap();
    let tgt_db = c.create_database("plan_tgt").unwrap();
    c.psql(&src_db, ORDERS_SCHEMA).unwrap();
    c.psql(&src_db, "ALTER TABLE public.orders REPLICA IDENTITY FULL")
        .unwrap();
    let text = orders_spec_text(&c.url(&src_db)).replace(
        "# url defaults to [source].url",
        &format!("url = \"{}\"", c.url(&tgt_db)),
    );
    let spec = parse(&text);
    assert!(!spec.same_database());
    let p = run_plan(&spec);
    assert!(p.ok(), "{}", p.render());
    // The FK into the old table is in the source database; the target knows nothing of it.
    assert_eq!(status(&p, names::FOREIGN_KEYS), Status::Warn);

    let bad = parse(&text.replace(
        r#"total_amount_minor = "total_amount::bigint""#,
        r#"total_amount_minor = "created_at""#,
    ));
    let p = run_plan(&bad);
    let t = p.check(names::TRANSFORMS).unwrap();
    assert_eq!(t.status, Status::Fail, "{}", p.render());
    assert!(
        t.detail.contains("timestamp with time zone"),
        "{}",
        t.detail
    );
    assert_eq!(
        c.psql(&tgt_db, "SELECT to_regclass('public.orders_v2') IS NULL")
            .unwrap(),
        "t"
    );
}

#[test]
fn lock_levels_the_runbook_claims() {
    // CREATE PUBLICATION takes SHARE UPDATE EXCLUSIVE on the table: reads and writes go on.
    let (c, db) = testpg::fresh_db("plan_locks").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    let mode = c
        .psql(
            &db,
            "BEGIN; CREATE PUBLICATION p_lock FOR TABLE public.orders;
             SELECT mode FROM pg_locks WHERE relation = 'public.orders'::regclass AND pid = pg_backend_pid();
             ROLLBACK;",
        )
        .unwrap();
    assert_eq!(mode.trim(), "ShareUpdateExclusiveLock");
    // ALTER TABLE … REPLICA IDENTITY (the fix plan offers) takes ACCESS EXCLUSIVE: the fix says so.
    let mode = c
        .psql(
            &db,
            "BEGIN; ALTER TABLE public.orders REPLICA IDENTITY FULL;
             SELECT mode FROM pg_locks WHERE relation = 'public.orders'::regclass AND pid = pg_backend_pid();
             ROLLBACK;",
        )
        .unwrap();
    assert_eq!(mode.trim(), "AccessExclusiveLock");
}

// ---- the binary -------------------------------------------------------------------------

const PASSWORD: &str = "Sup3rSecretPw";

fn shadowmig(spec_path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
        .arg("plan")
        .arg(spec_path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_exit_codes_and_no_password_anywhere() {
    let (c, db) = testpg::fresh_db("plan_bin").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    c.psql(
        &db,
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'plan_alice') THEN
                 CREATE ROLE plan_alice LOGIN REPLICATION PASSWORD '{PASSWORD}'; END IF; END $$;
             GRANT CREATE ON DATABASE \"{db}\" TO plan_alice;
             GRANT CREATE ON SCHEMA public TO plan_alice;
             ALTER TABLE public.orders OWNER TO plan_alice;
             GRANT SELECT ON public.customers TO plan_alice;"
        ),
    )
    .unwrap();
    let url = c.url_as("plan_alice", PASSWORD, &db);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.toml");

    // 1: the identity problem.
    std::fs::write(&path, orders_spec_text(&url)).unwrap();
    let (code, out, err) = shadowmig(&path);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("✘ replica identity"), "{out}");
    assert!(out.contains("postgres://plan_alice:***@127.0.0.1"), "{out}");
    assert!(
        !out.contains(PASSWORD) && !err.contains(PASSWORD),
        "{out}\n{err}"
    );

    // 0: after the fix.
    c.psql(&db, "ALTER TABLE public.orders REPLICA IDENTITY FULL")
        .unwrap();
    let (code, out, err) = shadowmig(&path);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("All checks passed"), "{out}");
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));

    // 2: unreachable server, one line, no password.
    let dead = url.replace(&format!(":{}/", c.port()), ":1/");
    std::fs::write(&path, orders_spec_text(&dead)).unwrap();
    let (code, out, err) = shadowmig(&path);
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot connect to postgres://plan_alice:***@127.0.0.1:1/"),
        "{err}"
    );
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD), "{err}");

    // 2: malformed spec; the bad line holds the URL, which must not be echoed.
    std::fs::write(
        &path,
        format!("name = \"x\"\n[source]\nurl = \"{url}\" oops\n"),
    )
    .unwrap();
    let (code, out, err) = shadowmig(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD), "{err}");

    // 2: a missing file.
    let (code, _, err) = shadowmig(&dir.path().join("absent.toml"));
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn unprivileged_role_gets_privilege_fixes() {
    let (c, db) = testpg::fresh_db("plan_priv").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    c.psql(
        &db,
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'plan_bob') THEN
             CREATE ROLE plan_bob LOGIN PASSWORD 'x'; END IF; END $$;",
    )
    .unwrap();
    let spec = parse(&orders_spec_text(&c.url_as("plan_bob", "x", &db)));
    let p = run_plan(&spec);
    let r = p.check(names::REPLICATION_PRIVILEGE).unwrap();
    assert_eq!(r.status, Status::Fail);
    assert_eq!(
        r.fix.as_deref().unwrap(),
        "ALTER ROLE \"plan_bob\" REPLICATION;  (as a superuser)"
    );
    let s = p.check(names::SOURCE_PRIVILEGES).unwrap();
    assert_eq!(s.status, Status::Fail);
    assert!(
        s.detail.contains("no SELECT") && s.detail.contains("does not own"),
        "{}",
        s.detail
    );
    assert!(s
        .fix
        .as_deref()
        .unwrap()
        .contains("GRANT SELECT ON \"public\".\"orders\" TO \"plan_bob\";"));
    // Not superuser: the data directory is hidden, so free disk cannot be checked.
    assert_eq!(status(&p, names::DISK), Status::Warn);
}

#[test]
fn computed_key_columns_are_checked_against_the_identity() {
    let (c, db) = testpg::fresh_db("plan_computed").unwrap();
    c.psql(
        &db,
        "CREATE TABLE public.events (id bigint PRIMARY KEY, tenant int NOT NULL, body text)",
    )
    .unwrap();
    let spec_for = |key_expr: &str| {
        parse(&format!(
            r#"name = "events"
[source]
url = "{}"
table = "events"
[target]
table = "events_v2"
create = "CREATE TABLE public.events_v2 (k bigint PRIMARY KEY, tenant int NOT NULL, body text)"
[transform]
k = "{key_expr}"
"#,
            c.url(&db)
        ))
    };
    // Computed from the primary key only: DEFAULT identity carries it.
    let p = run_plan(&spec_for("id * 10"));
    assert!(p.ok(), "{}", p.render());
    assert_eq!(status(&p, names::REPLICA_IDENTITY), Status::Ok);
    // Computed from a column the identity does not carry: only FULL helps.
    let p = run_plan(&spec_for("id * 10 + tenant"));
    let ri = p.check(names::REPLICA_IDENTITY).unwrap();
    assert_eq!(ri.status, Status::Fail, "{}", p.render());
    assert!(
        ri.detail.contains("computed by [transform] expressions"),
        "{}",
        ri.detail
    );
    assert!(ri.fix.as_deref().unwrap().contains("REPLICA IDENTITY FULL"));
}

#[test]
fn existing_target_table_is_used_and_rows_in_it_are_flagged() {
    let (c, db) = testpg::fresh_db("plan_existing").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    c.psql(&db, "ALTER TABLE public.orders REPLICA IDENTITY FULL")
        .unwrap();
    let text = orders_spec_text(&c.url(&db));
    // Create the target from the fixture's DDL, then plan without `create`.
    let spec = parse(&text);
    c.psql(&db, spec.target.create.as_deref().unwrap()).unwrap();
    let start = text.find("create = \"\"\"").unwrap();
    let end = start + text[start..].find("\"\"\"\n\n").unwrap() + 4;
    let without_create = format!("{}{}", &text[..start], &text[end..]);
    let spec = parse(&without_create);
    assert!(spec.target.create.is_none());
    let p = run_plan(&spec);
    assert!(p.ok(), "{}", p.render());
    assert_eq!(status(&p, names::TARGET_TABLE), Status::Ok);
    assert!(p.steps[3].rollback.contains("leaves"), "{:?}", p.steps[3]);

    c.psql(
        &db,
        "INSERT INTO public.orders_v2 (id, customer_id, created_at) VALUES (1, 1, now())",
    )
    .unwrap();
    let p = run_plan(&spec);
    assert_eq!(
        status(&p, names::TARGET_TABLE),
        Status::Warn,
        "{}",
        p.render()
    );
    assert!(p.ok());

    // With `create` given, an existing table is a failure.
    let p = run_plan(&parse(&text));
    let t = p.check(names::TARGET_TABLE).unwrap();
    assert_eq!(t.status, Status::Fail);
    assert!(t.detail.contains("already exists"), "{}", t.detail);
}

/// The statements of a no-old-key fix with the placeholder filled, the lock note left out.
fn identity_fix_statements(fix: &str, columns: &str) -> Vec<String> {
    fix.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CREATE ") || l.starts_with("ALTER "))
        .map(|l| {
            l.split("  (")
                .next()
                .unwrap()
                .replace("<NOT NULL columns>", columns)
        })
        .collect()
}

#[test]
fn a_source_without_an_old_key_gets_a_fix_from_what_it_has() {
    let (c, db) = testpg::fresh_db("plan_no_identity").unwrap();
    c.psql(&db, ORDERS_SCHEMA).unwrap();
    c.psql(&db, "ALTER TABLE public.orders REPLICA IDENTITY NOTHING")
        .unwrap();
    let spec = parse(&orders_spec_text(&c.url(&db)));
    let source_key = |p: &Plan| p.check(names::SOURCE_KEY).unwrap().clone();

    // NOTHING with a primary key: going back to DEFAULT is enough.
    let p = run_plan(&spec);
    let ck = source_key(&p);
    assert_eq!(ck.status, Status::Fail, "{}", p.render());
    assert!(ck.detail.contains("NOTHING"), "{}", ck.detail);
    let fix = ck.fix.clone().unwrap();
    assert!(
        fix.contains(r#"ALTER TABLE "public"."orders" REPLICA IDENTITY DEFAULT;"#),
        "{fix}"
    );
    assert!(fix.contains("lock_timeout"), "{fix}");
    for s in identity_fix_statements(&fix, "id") {
        c.psql(&db, &s).unwrap();
    }
    assert_eq!(status(&run_plan(&spec), names::SOURCE_KEY), Status::Ok);

    // No primary key, an existing unique index on a NOT NULL column: use it, or promote it.
    c.psql(
        &db,
        "ALTER TABLE public.orders DROP CONSTRAINT orders_pkey CASCADE;
         CREATE UNIQUE INDEX \"orders id\" ON public.orders (id)",
    )
    .unwrap();
    let ck = source_key(&run_plan(&spec));
    assert_eq!(ck.status, Status::Fail);
    assert!(
        ck.detail.contains("DEFAULT without a primary key"),
        "{}",
        ck.detail
    );
    let fix = ck.fix.clone().unwrap();
    assert!(
        fix.contains(r#"REPLICA IDENTITY USING INDEX "orders id";"#),
        "{fix}"
    );
    assert!(
        fix.contains(r#"ADD PRIMARY KEY USING INDEX "orders id";"#),
        "{fix}"
    );
    assert!(!fix.contains("CREATE UNIQUE INDEX"), "{fix}");
    let first = identity_fix_statements(&fix, "id").remove(0);
    c.psql(&db, &first).unwrap();
    assert_eq!(status(&run_plan(&spec), names::SOURCE_KEY), Status::Ok);

    // No primary key and no unique index: create one, then make it the identity.
    c.psql(
        &db,
        "ALTER TABLE public.orders REPLICA IDENTITY DEFAULT; DROP INDEX public.\"orders id\"",
    )
    .unwrap();
    let ck = source_key(&run_plan(&spec));
    assert_eq!(ck.status, Status::Fail);
    let fix = ck.fix.clone().unwrap();
    let stmts = identity_fix_statements(&fix, "id");
    assert_eq!(stmts.len(), 2, "{fix}");
    assert!(
        stmts[0].starts_with("CREATE UNIQUE INDEX CONCURRENTLY"),
        "{fix}"
    );
    for s in &stmts {
        c.psql(&db, s).unwrap();
    }
    assert_eq!(status(&run_plan(&spec), names::SOURCE_KEY), Status::Ok);
}
