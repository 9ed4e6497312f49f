//! etcd `Store` adapter on `etcd-client`. Every call has a deadline; transport failures
//! become `StoreError::Unavailable` so the API answers 503 and callers retry. The
//! client is (re)connected lazily, so the service starts and recovers while etcd is down.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{mpsc, RwLock};

use crate::ports::store::{
    Compare, Kv, Op, Store, StoreError, Txn, TxnResult, WatchEvent, WatchReceiver,
};

/// Connection settings for etcd.
#[derive(Clone)]
pub struct EtcdSettings {
    /// `host:port` or URLs.
    pub endpoints: Vec<String>,
    /// Prefix prepended to every key (may be empty).
    pub prefix: String,
    /// Optional user name and password.
    pub auth: Option<(String, String)>,
    /// Connection establishment deadline.
    pub dial_timeout: Duration,
    /// Per-request deadline.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field(
                "auth",
                &self.auth.as_ref().map(|(user, _)| (user, "<redacted>")),
            )
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// The etcd store.
pub struct EtcdStore {
    settings: EtcdSettings,
    client: RwLock<Option<Client>>,
}

/// Keys per page of a listing (one round trip each). Hydrating 210,000 records took
/// 3.1–3.3 s in pages of 500 and 1.4–1.7 s in pages of 2,000 (`scripts/scale.sh` at
/// 100,000 deployables; see the README).
const LIST_PAGE: i64 = 2000;

/// The largest answer a listing page may be (gRPC's default is 4 MiB): 2,000 records of
/// up to 128 KiB each (a bound, not an allocation); etcd itself refuses requests above
/// 1.5 MiB by default.
const LIST_MAX_MESSAGE: usize = 256 << 20;

/// The end of the key range holding every key that starts with `prefix` (etcd's rule:
/// the prefix with its last byte below 0xff incremented, the bytes after it dropped).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

impl EtcdStore {
    /// Creates the adapter; the connection is made on first use.
    pub fn new(settings: EtcdSettings) -> Self {
        Self {
            settings,
            client: RwLock::new(None),
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        if let Some(c) = self.client.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.client.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.settings.dial_timeout)
            .with_timeout(self.settings.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &self.settings.auth {
            opts = opts.with_user(user.clone(), password.clone());
        }
        let connect = Client::connect(self.settings.endpoints.clone(), Some(opts));
        let client = tokio::time::timeout(self.settings.dial_timeout, connect)
            .await
            .map_err(|_| StoreError::Unavailable("timed out connecting to etcd".into()))?
            .map_err(map_err)?;
        *slot = Some(client.clone());
        Ok(client)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.settings.prefix, key)
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Option<Kv> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        let key = key.strip_prefix(self.settings.prefix.as_str())?;
        Some(Kv {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
    }

    /// Runs `op` on the client within the request deadline. When the client's balancer
    /// picked a member it cannot connect to (a dead member of the cluster), the request
    /// never left this process, so it is safe to send again — even a transaction — and
    /// the next pick usually lands on a live member.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let attempt = async {
            let mut tries = 0u32;
            loop {
                let client = self.client().await?;
                match op(client).await {
                    Err(e) if is_connect_error(&e) && tries < CONNECT_RETRIES => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
                    }
                    other => return other.map_err(map_err),
                }
            }
        };
        tokio::time::timeout(self.settings.request_timeout, attempt)
            .await
            .map_err(|_| StoreError::Unavailable("etcd request timed out".into()))?
    }

    async fn deadline<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        tokio::time::timeout(self.settings.request_timeout, fut)
            .await
            .map_err(|_| StoreError::Unavailable("etcd request timed out".into()))?
            .map_err(map_err)
    }
}

/// How often a request that could not connect is sent again.
const CONNECT_RETRIES: u32 = 8;

/// Whether the request failed before reaching any member (nothing was sent).
fn is_connect_error(e: &etcd_client::Error) -> bool {
    let text = match e {
        etcd_client::Error::TransportError(t) => format!("{t:?}"),
        etcd_client::Error::GRpcStatus(s) => s.message().to_owned(),
        _ => return false,
    };
    let text = text.to_ascii_lowercase();
    text.contains("tcp connect error") || text.contains("connection refused")
}

fn map_err(e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let msg = status.message().to_owned();
            if msg.contains("lease not found") {
                StoreError::LeaseNotFound
            } else if msg.contains("compacted") {
                StoreError::Compacted(0)
            } else {
                // gRPC codes 3 (InvalidArgument) and 9 (FailedPrecondition) are the
                // request's fault; everything else means "try again later".
                match status.code() as i32 {
                    3 | 9 => StoreError::Other(msg),
                    _ => StoreError::Unavailable(format!("{:?}: {msg}", status.code())),
                }
            }
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let full = self.full(key);
        let resp = self
            .call(|mut c| {
                let k = full.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.kv(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let mut out = Vec::new();
        let rev = self.list_each(prefix, &mut |kvs| out.extend(kvs)).await?;
        Ok((out, rev))
    }

    async fn list_each(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<Kv>) + Send),
    ) -> Result<i64, StoreError> {
        // In pages of LIST_PAGE keys, all read at the first page's revision (one
        // consistent snapshot): a large prefix (100,000 records are ~25 MB) does not fit
        // the 4 MiB a gRPC answer may carry.
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = full.into_bytes();
        let mut rev = 0;
        loop {
            let resp = self
                .call(|c| {
                    let (k, e) = (from.clone(), end.clone());
                    let opts = GetOptions::new()
                        .with_range(e)
                        .with_limit(LIST_PAGE)
                        .with_revision(rev);
                    let mut kv = c.kv_client().max_decoding_message_size(LIST_MAX_MESSAGE);
                    async move { kv.get(k, Some(opts)).await }
                })
                .await?;
            if rev == 0 {
                rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            page(resp.kvs().iter().filter_map(|kv| self.kv(kv)).collect());
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(rev)
    }

    async fn list_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, bool), StoreError> {
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        // Just after `after` (the smallest key above it), or the prefix's first key.
        let from = match after {
            Some(a) if a >= prefix => {
                let mut k = self.full(a).into_bytes();
                k.push(0);
                k
            }
            _ => full.into_bytes(),
        };
        if end != [0] && from >= end {
            return Ok((Vec::new(), false));
        }
        // etcd reads everything for a limit of 0.
        let wanted = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call(|c| {
                let (k, e) = (from.clone(), end.clone());
                let opts = GetOptions::new().with_range(e).with_limit(wanted);
                let mut kv = c.kv_client().max_decoding_message_size(LIST_MAX_MESSAGE);
                async move { kv.get(k, Some(opts)).await }
            })
            .await?;
        let mut kvs: Vec<Kv> = resp.kvs().iter().filter_map(|kv| self.kv(kv)).collect();
        let more = resp.more() || kvs.len() > limit;
        kvs.truncate(limit);
        Ok((kvs, more))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision(k, rev) => {
                    EtcdCompare::mod_revision(self.full(k), CompareOp::Equal, *rev)
                }
                Compare::CreateRevision(k, rev) => {
                    EtcdCompare::create_revision(self.full(k), CompareOp::Equal, *rev)
                }
            })
            .collect();
        let success: Vec<TxnOp> = txn
            .success
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    TxnOp::put(self.full(key), value.clone(), opts)
                }
                Op::Delete { key } => TxnOp::delete(self.full(key), None),
            })
            .collect();
        let failure: Vec<TxnOp> = txn
            .failure_gets
            .iter()
            .map(|k| TxnOp::get(self.full(k), None))
            .collect();
        let request = EtcdTxn::new()
            .when(compares)
            .and_then(success)
            .or_else(failure);
        let resp = self
            .call(|mut c| {
                let r = request.clone();
                async move { c.txn(r).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let succeeded = resp.succeeded();
        let fetched = if succeeded {
            Vec::new()
        } else {
            resp.op_responses()
                .iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| self.kv(kv)),
                    _ => None,
                })
                .collect()
        };
        Ok(TxnResult {
            succeeded,
            revision,
            fetched,
        })
    }

    async fn grant_lease(&self, ttl_seconds: i64) -> Result<i64, StoreError> {
        let resp = self
            .call(|mut c| async move { c.lease_grant(ttl_seconds, None).await })
            .await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let mut c = self.client().await?;
        let fut = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
        };
        self.deadline(fut).await
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        match self
            .call(|mut c| async move { c.lease_revoke(lease).await })
            .await
        {
            Ok(_) | Err(StoreError::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchReceiver, StoreError> {
        let full = self.full(prefix);
        let mut stream = self
            .call(|mut c| {
                let k = full.clone();
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start_revision);
                async move { c.watch(k, Some(opts)).await }
            })
            .await?;
        let (tx, rx) = mpsc::channel(1024);
        let strip = self.settings.prefix.clone();
        tokio::spawn(async move {
            loop {
                let item = match stream.message().await {
                    Ok(Some(resp)) if resp.canceled() => {
                        let compacted = resp.compact_revision();
                        Err(if compacted > 0 {
                            StoreError::Compacted(compacted)
                        } else {
                            StoreError::Unavailable(format!(
                                "watch canceled: {}",
                                resp.cancel_reason()
                            ))
                        })
                    }
                    Ok(Some(resp)) => {
                        let events: Vec<WatchEvent> = resp
                            .events()
                            .iter()
                            .filter_map(|ev| {
                                let kv = ev.kv()?;
                                let key = std::str::from_utf8(kv.key()).ok()?;
                                let key = key.strip_prefix(strip.as_str())?.to_owned();
                                Some(match ev.event_type() {
                                    EventType::Put => WatchEvent::Put(Kv {
                                        key,
                                        value: kv.value().to_vec(),
                                        mod_revision: kv.mod_revision(),
                                        create_revision: kv.create_revision(),
                                    }),
                                    EventType::Delete => WatchEvent::Delete {
                                        key,
                                        mod_revision: kv.mod_revision(),
                                    },
                                })
                            })
                            .collect();
                        if events.is_empty() {
                            continue;
                        }
                        Ok(events)
                    }
                    Ok(None) => Err(StoreError::Unavailable("watch stream ended".into())),
                    Err(e) => Err(map_err(e)),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn health(&self) -> Result<(), StoreError> {
        // A linearizable read of a key that never exists: it goes through raft, so it
        // fails when the cluster has no quorum.
        let key = self.full("/health-probe");
        self.call(|mut c| {
            let k = key.clone();
            async move { c.get(k, None).await }
        })
        .await
        .map(|_| ())
    }

    fn name(&self) -> &'static str {
        "etcd"
    }
}
