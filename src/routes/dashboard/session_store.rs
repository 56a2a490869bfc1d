//! tower-sessions' store on our own database (SQLite or PostgreSQL, through `tollgate_core`),
//! so sessions need no second database stack. Ids are stored hashed (see `core::sessions`).
//! A session expires at its idle expiry or at the absolute end its login set, whichever comes
//! first, and is stored with its user, so that all of a user's sessions can be ended at once.

use async_trait::async_trait;
use time::OffsetDateTime;
use tollgate_core::Db;
use tollgate_core::sessions;
use tollgate_core::time::UnixMillis;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, SessionStore};

use super::session;

#[derive(Debug, Clone)]
pub struct DbSessionStore {
    db: Db,
}

impl DbSessionStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

fn backend(e: impl std::fmt::Display) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

/// A record as stored: its data, its expiry (idle or absolute, the earlier) and its user.
struct Encoded<'a> {
    data: String,
    expires_at: UnixMillis,
    user_id: Option<&'a str>,
}

impl Encoded<'_> {
    fn stored(&self) -> sessions::Stored<'_> {
        sessions::Stored { data: &self.data, expires_at: self.expires_at, user_id: self.user_id }
    }
}

fn encode(record: &Record) -> session_store::Result<Encoded<'_>> {
    let data = serde_json::to_string(&record.data).map_err(|e| session_store::Error::Encode(e.to_string()))?;
    let idle = UnixMillis(i64::try_from(record.expiry_date.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX));
    let ends = record.data.get(session::ENDS_AT).and_then(serde_json::Value::as_i64).map_or(idle, UnixMillis);
    let user_id = record.data.get(session::USER).and_then(serde_json::Value::as_str);
    Ok(Encoded { data, expires_at: idle.min(ends), user_id })
}

#[async_trait]
impl SessionStore for DbSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        loop {
            let created = {
                let encoded = encode(record)?;
                sessions::create(&self.db, &record.id.to_string(), encoded.stored()).await.map_err(backend)?
            };
            if created {
                return Ok(());
            }
            record.id = Id::default();
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let encoded = encode(record)?;
        sessions::save(&self.db, &record.id.to_string(), encoded.stored()).await.map_err(backend)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let Some((data, expires)) =
            sessions::load(&self.db, &id.to_string(), UnixMillis::now()).await.map_err(backend)?
        else {
            return Ok(None);
        };
        let data = serde_json::from_str(&data).map_err(|e| session_store::Error::Decode(e.to_string()))?;
        let expiry_date = OffsetDateTime::from_unix_timestamp_nanos(i128::from(expires.0) * 1_000_000)
            .map_err(|e| session_store::Error::Decode(e.to_string()))?;
        Ok(Some(Record { id: *id, data, expiry_date }))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        sessions::delete(&self.db, &id.to_string()).await.map_err(backend)
    }
}
