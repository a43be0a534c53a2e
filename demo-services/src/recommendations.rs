//! `recommendations`: products to show a user. v1 shows everyone the bestsellers; v2
//! (the canary) ranks the catalog per user. Same API: `{version, items}`.

use axum::{Router, extract::RawQuery, response::Response, routing::get};
use http::StatusCode;
use serde_json::json;

use crate::{
    args::Version,
    catalog::PRODUCTS,
    input::{InputError, query_param},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

/// How many products one answer recommends.
pub const COUNT: usize = 4;

pub fn routes(version: Version) -> ServiceRoutes {
    ServiceRoutes {
        http: Router::new().route(
            "/recommendations",
            get(move |query: RawQuery| recommend(version, query)),
        ),
        grpc: None,
    }
}

async fn recommend(version: Version, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let user = query_param(query.as_deref(), "user")?
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| InputError::new("user", "required query parameter"))?;
    let items = pick(version, &user);
    Ok(reply::json(
        StatusCode::OK,
        &json!({ "version": version.as_str(), "items": items }),
    ))
}

/// The product ids recommended to `user`.
pub fn pick(version: Version, user: &str) -> Vec<&'static str> {
    match version {
        Version::V1 => PRODUCTS.iter().take(COUNT).map(|p| p.id).collect(),
        Version::V2 => {
            // A stable per-user ranking: the same user sees the same picks on every call
            // and every replica, different users see different ones.
            let mut ranked: Vec<_> = PRODUCTS
                .iter()
                .map(|p| (affinity(user, p.id), p.id))
                .collect();
            ranked.sort_unstable();
            ranked.into_iter().take(COUNT).map(|(_, id)| id).collect()
        }
    }
}

fn affinity(user: &str, product_id: &str) -> u64 {
    user.bytes()
        .chain([0])
        .chain(product_id.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_the_bestsellers_for_everyone() {
        assert_eq!(pick(Version::V1, "alice"), ["p-01", "p-02", "p-03", "p-04"]);
        assert_eq!(pick(Version::V1, "bob"), pick(Version::V1, "alice"));
    }

    #[test]
    fn v2_is_stable_per_user_and_differs_between_users() {
        let alice = pick(Version::V2, "alice");
        assert_eq!(alice.len(), COUNT);
        assert_eq!(alice, pick(Version::V2, "alice"));
        let users = ["alice", "bob", "chen", "dana", "emil"];
        assert!(users.iter().any(|u| pick(Version::V2, u) != alice));
    }
}
