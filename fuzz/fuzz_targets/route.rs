//! `route::Router::find` over a few templates, on arbitrary paths.
//!
//! Invariants: never panics; a match puts its names back into its template to give the path
//! exactly; names of a `Postback` match are valid, a `BadName` match has an invalid one; the first
//! route (in order) whose shape fits wins, and a path no template fits is not taken.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postback_proxy::postback::route::RouteConfig;
use postback_proxy::postback::route::{valid_name, Route, RouteMatch, Router};

const ROUTES: &str = r#"
- { path: "/postback/v3/event/{database}/{table}" }
- { path: "/px/{table}.gif", database: web, default_format: pixel }
- { path: "/td/{database}/{table}" }
- { path: "/x/db_{database}_db/t.{table}", sink: main }
- { path: "/aa/a{table}a", database: fixed }
- { path: "/" , database: root, table: index }
"#;

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let cfgs: Vec<RouteConfig> = serde_saphyr::from_str(ROUTES).expect("route YAML");
        Router::new(
            cfgs.iter()
                .enumerate()
                .map(|(i, c)| {
                    Route::compile(c, vec![0], &format!("routes[{i}]")).expect("compiles")
                })
                .collect(),
        )
    })
}

/// An independent matcher: (database, table) captured by `template` from `path`, where
/// `fixed_db`/`fixed_table` stand for names the template does not capture.
fn reference(
    template: &str,
    path: &str,
    fixed_db: Option<&str>,
    fixed_table: Option<&str>,
) -> Option<(String, String)> {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() || !path.starts_with('/') {
        return None;
    }
    let (mut db, mut table) = (fixed_db.map(str::to_owned), fixed_table.map(str::to_owned));
    for (ts, ps) in t.iter().zip(&p) {
        let (var, open) = match (ts.find("{database}"), ts.find("{table}")) {
            (Some(i), _) => ("{database}", i),
            (_, Some(i)) => ("{table}", i),
            _ => {
                if ts != ps {
                    return None;
                }
                continue;
            }
        };
        let (prefix, suffix) = (&ts[..open], &ts[open + var.len()..]);
        if ps.len() < prefix.len() + suffix.len()
            || !ps.starts_with(prefix)
            || !ps.ends_with(suffix)
        {
            return None;
        }
        let name = ps[prefix.len()..ps.len() - suffix.len()].to_owned();
        if var == "{database}" {
            db = Some(name);
        } else {
            table = Some(name);
        }
    }
    Some((db?, table?))
}

fn fixed(template: &str) -> (Option<&'static str>, Option<&'static str>) {
    match template {
        "/px/{table}.gif" => (Some("web"), None),
        "/aa/a{table}a" => (Some("fixed"), None),
        "/" => (Some("root"), Some("index")),
        _ => (None, None),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let router = router();
    let found = router.find(path);
    let expected = router.routes().iter().find_map(|r| {
        let (db, table) = fixed(&r.template);
        reference(&r.template, path, db, table).map(|names| (r, names))
    });
    match (found, expected) {
        (None, None) => {}
        (Some(m), Some((want_route, (db, table)))) => {
            let route = match &m {
                RouteMatch::Postback { route, .. } | RouteMatch::BadName { route, .. } => *route,
            };
            assert!(
                std::ptr::eq(route, want_route),
                "{path:?}: matched {} instead of {}",
                route.template,
                want_route.template
            );
            match m {
                RouteMatch::Postback {
                    database, table: t, ..
                } => {
                    let (database, t) = (database.in_path(path), t.in_path(path));
                    assert!(valid_name(database) && valid_name(t));
                    assert_eq!((database, t), (db.as_str(), table.as_str()), "{path:?}");
                    let rebuilt = route
                        .template
                        .replace("{database}", database)
                        .replace("{table}", t);
                    assert_eq!(rebuilt, path);
                }
                RouteMatch::BadName { .. } => {
                    assert!(!(valid_name(&db) && valid_name(&table)), "{path:?}");
                }
            }
        }
        (found, expected) => panic!(
            "{path:?}: router {:?}, reference {:?}",
            found.is_some(),
            expected.map(|(_, n)| n)
        ),
    }
});
