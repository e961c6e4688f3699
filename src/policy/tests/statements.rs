//! The statement gate and structural refusals: row-level output, identifiers, single-value
//! aggregates, collections and windows, statements other than one read-only query.

use super::*;

#[tokio::test]
async fn row_level_output_is_refused_in_every_spelling() {
    for sql in [
        "SELECT age, district FROM patients",
        "WITH t AS (SELECT * FROM patients) SELECT district FROM t",
        "SELECT d FROM (SELECT district AS d FROM patients) x ORDER BY d LIMIT 3",
        "SELECT p.age FROM patients p JOIN visits v ON p.person_id = v.person_id",
        "SELECT age FROM patients UNION ALL SELECT age FROM patients",
    ] {
        let e = refusal(sql).await;
        assert!(
            matches!(e, PolicyError::RowLevel | PolicyError::Unsupported(_)),
            "{sql}: {e}"
        );
    }
}

#[tokio::test]
async fn identifiers_only_in_joins_and_count_distinct() {
    for sql in [
        "SELECT person_id, COUNT(*) FROM visits GROUP BY person_id",
        "SELECT COUNT(*) FROM patients WHERE person_id = 'a0'",
        "SELECT COUNT(*) FROM patients WHERE upper(person_id) LIKE 'A%'",
        "SELECT COUNT(*) FROM (SELECT person_id AS x FROM patients) t WHERE x = 'a0'",
        "SELECT COUNT(*) FROM patients p JOIN visits v ON p.person_id > v.person_id",
        "SELECT SUM(length(person_id)) FROM patients",
        "SELECT COUNT(person_id) FROM patients HAVING COUNT(*) > 1 ORDER BY min(person_id)",
    ] {
        let e = refusal(sql).await;
        assert!(
            matches!(e, PolicyError::Identifier { .. } | PolicyError::Function { .. }),
            "{sql}: {e}"
        );
    }
    // Allowed uses.
    run("SELECT COUNT(DISTINCT person_id) AS people FROM visits").await;
    run("SELECT COUNT(*) FROM patients p JOIN visits v ON p.person_id = v.person_id").await;
    run("SELECT COUNT(*) FROM patients WHERE person_id IN (SELECT person_id FROM visits)").await;
}

#[tokio::test]
async fn single_value_aggregates_collections_and_windows_are_refused() {
    for (sql, name) in [
        ("SELECT MAX(age) FROM patients", "MAX"),
        ("SELECT district, MIN(age) FROM patients GROUP BY district", "MIN"),
        ("SELECT median(age) FROM patients", "MEDIAN"),
        ("SELECT array_agg(district) FROM patients", "ARRAY_AGG"),
        ("SELECT string_agg(district, ',') FROM patients", "STRING_AGG"),
    ] {
        match refusal(sql).await {
            PolicyError::Function { function, .. } => assert_eq!(function, name, "{sql}"),
            e => panic!("{sql}: {e}"),
        }
    }
    assert!(matches!(
        refusal("SELECT age, row_number() OVER (ORDER BY age) FROM patients").await,
        PolicyError::Function { .. }
    ));
    assert!(matches!(
        refusal("SELECT (SELECT age FROM patients LIMIT 1)").await,
        PolicyError::Function { .. }
    ));
}

#[tokio::test]
async fn only_single_read_only_queries() {
    for sql in [
        "CREATE TABLE x AS SELECT 1",
        "DROP TABLE patients",
        "INSERT INTO patients VALUES ('z', 'A', 1)",
        "SET datafusion.execution.batch_size = 1",
        "EXPLAIN SELECT COUNT(*) FROM patients",
        "COPY patients TO '/tmp/x.csv'",
    ] {
        let e = refusal(sql).await;
        assert!(
            matches!(e, PolicyError::NotAQuery(_) | PolicyError::Sql(_)),
            "{sql}: {e}"
        );
    }
    assert!(matches!(refusal("SELECT 1; SELECT 2").await, PolicyError::Sql(_)));
    assert!(matches!(
        refusal("SELECT COUNT(*) FROM opt_outs").await,
        PolicyError::Sql(_)
    ));
}
