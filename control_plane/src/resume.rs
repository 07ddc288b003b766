//! A watch that outlives its connection: the etcd and remote stores both
//! forward changes to a reader through [`follow`], which reopens the watch
//! from the first revision not yet delivered whenever the connection is lost.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{Event, Revision, StoreError};

/// First wait before reopening a broken watch; it doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between attempts to reach the store again.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where a watch's changes come from.
pub(crate) trait WatchSource: Send + Sync + 'static {
    type Stream: Send;

    /// Opens a watch of `prefix` from revision `start`.
    fn open(
        &self,
        prefix: &str,
        start: Revision,
    ) -> impl Future<Output = Result<Self::Stream, StoreError>> + Send;

    /// The next changes on `stream`, opened for revisions from `next` on; an
    /// error when the stream broke or ended.
    fn recv(
        stream: &mut Self::Stream,
        next: Revision,
    ) -> impl Future<Output = Result<Vec<Event>, StoreError>> + Send;
}

/// Forwards the changes of `stream` to `tx` from revision `next` on, each
/// once and in order: a reopened watch may repeat what was delivered, and
/// that is skipped. Ends when the reader goes away, or with an error to the
/// reader when the watch cannot go on (the history it needs was compacted,
/// or the store calls the watch invalid): the reader must list again.
pub(crate) async fn follow<S: WatchSource>(
    source: S,
    prefix: String,
    mut stream: S::Stream,
    mut next: Revision,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let received = tokio::select! {
            () = tx.closed() => return,
            received = S::recv(&mut stream, next) => received,
        };
        match received {
            Ok(events) => {
                let events: Vec<Event> = events
                    .into_iter()
                    .filter(|e| e.revision() >= next)
                    .collect();
                if let Some(last) = events.last() {
                    next = last.revision() + 1;
                    if tx.send(Ok(events)).await.is_err() {
                        return;
                    }
                }
                backoff = MIN_BACKOFF;
                continue;
            }
            Err(error @ (StoreError::Compacted { .. } | StoreError::Invalid(_))) => {
                let _ = tx.send(Err(error)).await;
                return;
            }
            Err(error) => tracing::debug!(%error, next, prefix, "watch interrupted; resuming"),
        }
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match source.open(&prefix, next).await {
                Ok(s) => {
                    stream = s;
                    break;
                }
                Err(e @ StoreError::Compacted { .. }) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(error) => tracing::debug!(%error, next, prefix, "watch not reopened"),
            }
        }
    }
}
