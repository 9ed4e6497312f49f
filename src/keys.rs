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
