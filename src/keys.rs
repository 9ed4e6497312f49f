//! The etcd key layout (relative to `ETCD_PREFIX`), in one place.

/// Prefix of every shadow deployable record.
pub const SHADOW_PREFIX: &str = "/shadow-deployables/";

/// `/shadow-deployables/{env}/{name}`.
pub fn shadow(env: &str, name: &str) -> String {
    format!("{SHADOW_PREFIX}{env}/{name}")
}

/// `/shadow-deployables-index/{env}/in-use/{name}`.
pub fn shadow_in_use(env: &str, name: &str) -> String {
    format!("/shadow-deployables-index/{env}/in-use/{name}")
}

/// `/idempotency/{scope}/{key}`.
pub fn idempotency(scope: &str, key: &str) -> String {
    format!("/idempotency/{scope}/{key}")
}

/// Prefix of worker records.
pub const WORKER_PREFIX: &str = "/workers/";
/// Prefix of instance records.
pub const INSTANCE_PREFIX: &str = "/instances/";
/// The controller election key.
pub const LEADER: &str = "/leader/controller";

/// `/workers/{id}`.
pub fn worker(id: &str) -> String {
    format!("{WORKER_PREFIX}{id}")
}

/// `/instances/{id}`.
pub fn instance(id: &str) -> String {
    format!("{INSTANCE_PREFIX}{id}")
}

/// Prefix of watch intents.
pub const WATCH_INTENT_PREFIX: &str = "/watch-intents/";

/// `/watch-intents/{request_id}`.
pub fn watch_intent(request_id: &str) -> String {
    format!("{WATCH_INTENT_PREFIX}{request_id}")
}

/// The id of a key directly under `prefix` (`/workers/{id}` -> `id`).
pub fn child<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Splits `/shadow-deployables/{env}/{name}` into `(env, name)`.
pub fn parse_shadow(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(SHADOW_PREFIX)?;
    let (env, name) = rest.split_once('/')?;
    if env.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some((env, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_keys_round_trip() {
        let k = shadow("int", "a-b");
        assert_eq!(k, "/shadow-deployables/int/a-b");
        assert_eq!(parse_shadow(&k), Some(("int", "a-b")));
        assert_eq!(parse_shadow("/shadow-deployables/int/"), None);
        assert_eq!(parse_shadow("/shadow-deployables/int/a/b"), None);
        assert_eq!(parse_shadow("/workers/x"), None);
    }
}
