//! The engine tests' own instruments: the orders workload really changes data in every way
//! it claims to, and the independent SQL check can fail.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use shadowmig::testpg;

#[tokio::test]
async fn the_check_passes_on_a_faithful_copy_and_fails_after_writes() {
    let (c, db) = testpg::fresh_db("workload_check").unwrap();
    c.psql(&db, common::ORDERS_SOURCE).unwrap();
    c.psql(&db, common::ORDERS_TARGET).unwrap();
    c.psql(&db, &common::orders_seed_sql(500)).unwrap();
    c.psql(&db, &format!("INSERT INTO public.orders_v2 (customer_id, id, total_amount_minor, currency, status, note, created_at) {}", common::ORDERS_EXPECTED)).unwrap();
    common::assert_orders_equal(c, &db);

    let before = c.psql(&db, "SELECT count(*) FILTER (WHERE note IS NOT NULL AND length(note) > 2000), max(id) FROM orders").unwrap();
    let mut client = c.client(&db).await.unwrap();
    let stats =
        common::orders_workload(&mut client, 42, Arc::new(AtomicBool::new(false)), 300).await;
    assert!(stats.committed > 200, "{stats:?}");
    assert!(stats.rolled_back > 0, "{stats:?}");
    let after = c.psql(&db, "SELECT count(*) FILTER (WHERE note IS NOT NULL AND length(note) > 2000), max(id) FROM orders").unwrap();
    assert_ne!(before, after);

    let (missing, extra) = common::diff(c, &db, common::ORDERS_EXPECTED, common::ORDERS_ACTUAL);
    assert!(
        !missing.is_empty() && !extra.is_empty(),
        "the check must see the workload's changes"
    );
    let r = std::panic::catch_unwind(|| common::assert_orders_equal(c, &db));
    assert!(
        r.is_err(),
        "assert_orders_equal must fail on a stale target"
    );
}
