//! `user`: customer accounts, a few seeded and any number created with `POST /users`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    response::Response,
    routing::{get, post},
};
use http::StatusCode;
use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    input::{InputError, json_body, object},
    reply::{self, ApiError},
    serve::ServiceRoutes,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub email: String,
}

const SEED: &[(&str, &str, &str)] = &[
    ("alice", "Alice Martin", "alice@example.com"),
    ("bob", "Bob Okafor", "bob@example.com"),
    ("chen", "Chen Wei", "chen@example.com"),
    ("dana", "Dana Kowalski", "dana@example.com"),
    ("emil", "Emil Haddad", "emil@example.com"),
];

#[derive(Debug, Default)]
struct Accounts {
    users: BTreeMap<String, User>,
    next: u64,
}

#[derive(Debug, Clone)]
struct UserService {
    accounts: Arc<Mutex<Accounts>>,
}

pub fn routes() -> ServiceRoutes {
    let users = SEED
        .iter()
        .map(|(id, name, email)| {
            let user = User {
                id: (*id).to_string(),
                name: (*name).to_string(),
                email: (*email).to_string(),
            };
            (user.id.clone(), user)
        })
        .collect();
    let service = UserService {
        accounts: Arc::new(Mutex::new(Accounts { users, next: 1 })),
    };
    ServiceRoutes {
        http: Router::new()
            .route("/users", post(create))
            .route("/users/{id}", get(find))
            .with_state(service),
        grpc: None,
    }
}

async fn find(
    State(service): State<UserService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let accounts = service.accounts.lock();
    accounts
        .users
        .get(&id)
        .map(|user| reply::json(StatusCode::OK, user))
        .ok_or_else(|| ApiError::not_found(format!("no user {id:?}")))
}

async fn create(State(service): State<UserService>, body: Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let fields = object(&body)?;
    fields.only(&["name", "email"])?;
    let name = fields.string("name")?.trim();
    let email = fields.string("email")?.trim();
    let valid_email = email
        .split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
    if !valid_email {
        return Err(InputError::new("email", format!("{email:?} is not an email address")).into());
    }
    let user = {
        let mut accounts = service.accounts.lock();
        if accounts
            .users
            .values()
            .any(|u| u.email.eq_ignore_ascii_case(email))
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("email: {email:?} belongs to an account already"),
            ));
        }
        let id = format!("u-{:04}", accounts.next);
        accounts.next += 1;
        let user = User {
            id: id.clone(),
            name: name.to_string(),
            email: email.to_string(),
        };
        accounts.users.insert(id, user.clone());
        user
    };
    tracing::info!(user_id = user.id, "user created");
    Ok(reply::json(StatusCode::CREATED, &user))
}
