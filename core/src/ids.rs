//! Typed identifiers. Every entity id is a prefixed, time-ordered UUIDv7 (`org_0190…`),
//! stored as TEXT, so an id names its kind in logs, URLs and the API, and one kind of id
//! can never be passed where another is expected.

macro_rules! define_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new, unique, time-ordered id.
            pub fn generate() -> Self {
                Self(format!("{}_{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// Accepts a string only if it has this id's shape (prefix and 32 hex digits).
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($prefix)?.strip_prefix('_')?;
                (rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl sqlx::Type<sqlx::Sqlite> for $name {
            fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
                <String as sqlx::Type<sqlx::Sqlite>>::type_info()
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::Type<sqlx::Postgres>>::type_info()
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $name
        where
            String: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                self.0.encode_by_ref(buf)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            String: sqlx::Decode<'r, DB>,
        {
            fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(Self(String::decode(value)?))
            }
        }
    };
}

define_id!(
    /// A tenant: a SaaS team with members and projects.
    OrgId,
    "org"
);
define_id!(
    /// A person who can log in to the dashboard.
    UserId,
    "usr"
);

define_id!(
    /// A tenant's project: keys, providers, prices and customers belong to one.
    ProjectId,
    "prj"
);
define_id!(
    /// A project key (secret or publishable); the key itself is never stored.
    KeyId,
    "key"
);
define_id!(
    /// A connection to an LLM provider.
    ProviderId,
    "prv"
);
define_id!(
    /// An end-customer of a tenant, as Tollgate knows them.
    CustomerId,
    "cus"
);
define_id!(
    /// An open reservation of budget for a call in flight.
    ReservationId,
    "rsv"
);
define_id!(
    /// One life of a serving process: its reservations are released when its heartbeat stops.
    InstanceId,
    "ins"
);
define_id!(
    /// One settled, refused or failed call in the usage ledger.
    UsageEventId,
    "use"
);
define_id!(
    /// An invitation to join an organization.
    InvitationId,
    "inv"
);
define_id!(
    /// One entry of an organization's audit log.
    AuditId,
    "aud"
);
define_id!(
    /// A budget alert fired for one customer (at most once per period and kind).
    AlertId,
    "alr"
);
define_id!(
    /// One delivery of an alert to one webhook or mailbox.
    DeliveryId,
    "dlv"
);
define_id!(
    /// Settled usage Stripe would invoice nowhere (its subscription ended), put on a one-off
    /// invoice at the tenant's request: the usage events name it in `meter_batch_id`.
    OneOffInvoiceId,
    "ooi"
);
define_id!(
    /// A batch of settled usage sent to Stripe as one meter event (its identifier).
    MeterBatchId,
    "mtb"
);

impl MeterBatchId {
    /// The `index`th further part of a batch too large for one meter event (`mtb_…-2`): fixed
    /// by the batch, so a resent part is known to Stripe by its identifier.
    pub fn part(&self, index: usize) -> Self {
        Self(format!("{}-{index}", self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_prefix_and_parse_back() {
        let id = OrgId::generate();
        assert!(id.as_str().starts_with("org_"));
        assert_eq!(OrgId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(UserId::parse(id.as_str()), None);
        assert_eq!(OrgId::parse("org_xyz"), None);
    }
}
