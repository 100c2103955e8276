//! Catalog queries against a real server, on names with quotes, spaces, capitals and unicode.

use shadowmig::catalog::{self, FkDirection, ReplicaIdentity};
use shadowmig::spec::QualifiedName;
use shadowmig::testpg;

const SCHEMA: &str = r#"
CREATE SCHEMA "Shop ""EU""";
CREATE TABLE "Shop ""EU"""."Kunden ✓" ("Kunde Id" bigint PRIMARY KEY);
CREATE TABLE "Shop ""EU"""."Orders ✓" (
    "Order ""Id""" bigint PRIMARY KEY,
    "doomed" int,
    "Kunde ✓" bigint NOT NULL REFERENCES "Shop ""EU"""."Kunden ✓" ("Kunde Id"),
    "Betrag" numeric(12,2),
    "Note" text DEFAULT 'x'
);
ALTER TABLE "Shop ""EU"""."Orders ✓" DROP COLUMN "doomed";
CREATE UNIQUE INDEX "Both ✓" ON "Shop ""EU"""."Orders ✓" ("Order ""Id""", "Kunde ✓");
CREATE UNIQUE INDEX "partial" ON "Shop ""EU"""."Orders ✓" ("Betrag") WHERE "Betrag" > 0;
CREATE TABLE "Shop ""EU"""."Lines" ("Line" int PRIMARY KEY,
    "Order" bigint REFERENCES "Shop ""EU"""."Orders ✓" ("Order ""Id"""));
CREATE TABLE "Shop ""EU"""."Parted ✓" ("Kunde ✓" bigint NOT NULL, "Id" bigint NOT NULL,
    PRIMARY KEY ("Kunde ✓", "Id")) PARTITION BY HASH ("Kunde ✓");
CREATE TABLE "Shop ""EU"""."Parted p0" PARTITION OF "Shop ""EU"""."Parted ✓" FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE "Shop ""EU"""."Parted p1" PARTITION OF "Shop ""EU"""."Parted ✓" FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO "Shop ""EU"""."Parted ✓" SELECT g % 7, g FROM generate_series(1, 2000) g;
"#;

#[tokio::test]
async fn catalog_reads_awkward_names() {
    let (c, db) = testpg::fresh_db("catalog").unwrap();
    c.psql(&db, SCHEMA).unwrap();
    let client = c.client(&db).await.unwrap();
    let orders = QualifiedName::parse(r#""Shop ""EU"""."Orders ✓""#).unwrap();
    let oid = catalog::table_oid(&client, &orders)
        .await
        .unwrap()
        .expect("exists");
    assert_eq!(catalog::table_name(&client, oid).await.unwrap(), orders);
    assert_eq!(
        catalog::table_oid(&client, &QualifiedName::new("Shop \"EU\"", "orders ✓"))
            .await
            .unwrap(),
        None,
        "names are case-sensitive once quoted"
    );

    let cols = catalog::columns(&client, oid).await.unwrap();
    let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["Order \"Id\"", "Kunde ✓", "Betrag", "Note"],
        "dropped column skipped"
    );
    assert_eq!(cols[2].type_name, "numeric(12,2)");
    assert!(cols[1].not_null && !cols[2].not_null);
    assert!(cols[3].has_default && !cols[2].has_default);

    assert_eq!(
        catalog::primary_key(&client, oid).await.unwrap(),
        Some(vec!["Order \"Id\"".to_string()])
    );
    let idx = catalog::unique_indexes(&client, oid).await.unwrap();
    let both = idx.iter().find(|i| i.name == "Both ✓").unwrap();
    assert_eq!(both.columns, ["Order \"Id\"", "Kunde ✓"]);
    assert!(both.usable_as_key());
    let partial = idx.iter().find(|i| i.name == "partial").unwrap();
    assert!(partial.partial && !partial.usable_as_key());

    assert_eq!(
        catalog::replica_identity(&client, oid).await.unwrap(),
        ReplicaIdentity::Default
    );
    c.psql(
        &db,
        r#"ALTER TABLE "Shop ""EU"""."Orders ✓" REPLICA IDENTITY USING INDEX "Both ✓""#,
    )
    .unwrap();
    assert_eq!(
        catalog::replica_identity(&client, oid).await.unwrap(),
        ReplicaIdentity::Index {
            name: "Both ✓".into(),
            columns: vec!["Order \"Id\"".into(), "Kunde ✓".into()]
        }
    );
    c.psql(
        &db,
        r#"ALTER TABLE "Shop ""EU"""."Orders ✓" REPLICA IDENTITY FULL"#,
    )
    .unwrap();
    assert_eq!(
        catalog::replica_identity(&client, oid).await.unwrap(),
        ReplicaIdentity::Full
    );

    let fks = catalog::foreign_keys(&client, oid).await.unwrap();
    assert_eq!(fks.len(), 2, "{fks:?}");
    let out = fks
        .iter()
        .find(|f| f.direction == FkDirection::Out)
        .unwrap();
    assert_eq!(out.to_table.name, "Kunden ✓");
    assert_eq!(out.from_columns, ["Kunde ✓"]);
    assert_eq!(out.to_columns, ["Kunde Id"]);
    let inn = fks.iter().find(|f| f.direction == FkDirection::In).unwrap();
    assert_eq!(inn.from_table, QualifiedName::new("Shop \"EU\"", "Lines"));
    assert_eq!(inn.to_columns, ["Order \"Id\""]);

    assert_eq!(catalog::partitioning(&client, oid).await.unwrap(), None);
    let parted = QualifiedName::parse(r#""Shop ""EU"""."Parted ✓""#).unwrap();
    let poid = catalog::table_oid(&client, &parted).await.unwrap().unwrap();
    let p = catalog::partitioning(&client, poid).await.unwrap().unwrap();
    assert_eq!(p.strategy, "hash");
    assert_eq!(p.columns, [Some("Kunde ✓".to_string())]);
    assert_eq!(p.partitions, 2);
    assert_eq!(
        catalog::row_key(&client, poid).await.unwrap().map(|k| k.1),
        Some(vec!["Kunde ✓".to_string(), "Id".to_string()])
    );
    // A partitioned table's size is its partitions' size.
    let size = catalog::table_size(&client, poid).await.unwrap();
    assert!(size > 8192 * 2, "{size}");
    assert!(catalog::has_rows(&client, &parted).await.unwrap());

    let s = catalog::server_settings(&client).await.unwrap();
    assert_eq!(s.wal_level, "logical");
    assert_eq!(s.max_slot_wal_keep_size_mb, -1);
    assert_eq!(s.port, i64::from(c.port()));
    assert!(s.data_directory.is_some(), "superuser sees data_directory");
    let u = catalog::replication_usage(&client).await.unwrap();
    assert!(u.slots >= 0 && u.walsenders >= 0);
    let pr = catalog::privileges(&client).await.unwrap();
    assert!(pr.superuser);
    let tp = catalog::table_privileges(&client, oid).await.unwrap();
    assert!(tp.select && tp.write && tp.owner);
    assert_eq!(
        catalog::schema_create(&client, "Shop \"EU\"")
            .await
            .unwrap(),
        Some(true)
    );
    assert_eq!(
        catalog::schema_create(&client, "no such schema")
            .await
            .unwrap(),
        None
    );
}
