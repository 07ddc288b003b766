//! One store handle for every kind of store a process can be pointed at, chosen
//! by the address's scheme:
//!
//! - `http://host:port` — a tandem control-plane store (`tandem control` or the
//!   one `tandem up` hosts), through [`RemoteStore`];
//! - `etcd://host:port[,host:port...]` — etcd members, plain;
//! - `etcds://host:port[,host:port...]` — etcd members over mutual TLS, with
//!   the client's files from a TLS directory.

use std::path::Path;
use std::time::Duration;

use crate::etcd::{EtcdStore, EtcdTls};
use crate::remote::RemoteStore;
use crate::store::{Compare, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream};

/// A [`Store`] chosen at run time from an address.
#[derive(Clone)]
pub enum AnyStore {
    Tandem(RemoteStore),
    Etcd(EtcdStore),
}

impl AnyStore {
    /// The store at `address` (see the module docs). `tls_dir` holds
    /// `ca.pem`, `node.pem` and `node.key` for `etcds://`.
    pub fn connect(address: &str, tls_dir: Option<&Path>) -> Result<Self, StoreError> {
        let members = |rest: &str| -> Result<Vec<String>, StoreError> {
            let members: Vec<String> = rest
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            if members.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "store address {address:?} names no etcd member"
                )));
            }
            Ok(members)
        };
        if let Some(rest) = address.strip_prefix("etcd://") {
            return Ok(Self::Etcd(EtcdStore::connect(&members(rest)?)?));
        }
        if let Some(rest) = address.strip_prefix("etcds://") {
            let dir = tls_dir.ok_or_else(|| {
                StoreError::Invalid(format!(
                    "store address {address:?} is etcd over TLS: give the client's TLS directory (--store-tls-dir)"
                ))
            })?;
            let tls = EtcdTls::from_dir(dir)?;
            return Ok(Self::Etcd(EtcdStore::connect_tls(
                &members(rest)?,
                Some(&tls),
            )?));
        }
        if address.starts_with("http://") || address.starts_with("https://") {
            return Ok(Self::Tandem(RemoteStore::connect(address)?));
        }
        Err(StoreError::Invalid(format!(
            "store address {address:?}: expected http://host:port (a tandem store), \
             etcd://host:port[,...] or etcds://host:port[,...]"
        )))
    }
}

/// Runs `$body` with `$s` bound to whichever store this is.
macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnyStore::Tandem($s) => $body,
            AnyStore::Etcd($s) => $body,
        }
    };
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        each!(self, s => s.get(key).await)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        each!(self, s => s.put(key, value, lease).await)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        each!(self, s => s.delete(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        each!(self, s => s.list(prefix).await)
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        each!(self, s => s.watch(prefix, start).await)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        each!(self, s => s.lease_grant(ttl).await)
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        each!(self, s => s.lease_keepalive(id).await)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        each!(self, s => s.lease_revoke(id).await)
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.txn(compare, success, failure).await)
    }

    async fn campaign(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.campaign(key, value, lease).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_scheme_picks_the_store_and_bad_addresses_say_why() {
        assert!(matches!(
            AnyStore::connect("http://127.0.0.1:1", None),
            Ok(AnyStore::Tandem(_))
        ));
        assert!(matches!(
            AnyStore::connect("etcd://127.0.0.1:1,127.0.0.1:2", None),
            Ok(AnyStore::Etcd(_))
        ));
        let err = |a: &str, dir: Option<&Path>| match AnyStore::connect(a, dir) {
            Err(StoreError::Invalid(m)) => m,
            Err(e) => panic!("{a}: unexpected error {e}"),
            Ok(_) => panic!("{a}: accepted"),
        };
        assert!(err("etcds://127.0.0.1:1", None).contains("--store-tls-dir"));
        assert!(err("etcds://127.0.0.1:1", Some(Path::new("/nonexistent"))).contains("ca.pem"));
        assert!(err("etcd://", None).contains("no etcd member"));
        assert!(err("127.0.0.1:2379", None).contains("expected http://"));
    }
}
