//! Raft traffic between nodes over gRPC (`tandem.raft.v1.Raft`): a sending task
//! per peer, and the service that takes peers' messages, forwarded proposals and
//! lease keepalives.

use std::sync::Arc;

use protobuf::Message as _;
use raft::prelude::Message;
use tandem_protocol::grpc::raft as pb;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::Core;
use super::node::{Msg, ProposeError, is_snapshot};
use crate::service::to_status;

pub(crate) type RaftClient = pb::raft_client::RaftClient<Channel>;

/// Starts the task that sends this node's messages to peer `to`, in order.
/// When the peer cannot be reached the queued messages are dropped (Raft sends
/// again) and the node is told, so it probes the peer instead of streaming to it.
pub(crate) fn spawn_sender(
    to: u64,
    client: RaftClient,
    node: std::sync::mpsc::Sender<Msg>,
) -> mpsc::UnboundedSender<Message> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let snapshot = is_snapshot(&msg);
            let ok = match msg.write_to_bytes() {
                Ok(message) => client
                    .clone()
                    .step(pb::StepRequest { message })
                    .await
                    .is_ok(),
                Err(e) => {
                    tracing::warn!(to, error = %e, "could not encode a raft message");
                    false
                }
            };
            if snapshot {
                let _ = node.send(Msg::SnapshotStatus { to, ok });
            }
            if !ok {
                let _ = node.send(Msg::Unreachable(to));
                while let Ok(dropped) = rx.try_recv() {
                    if is_snapshot(&dropped) {
                        let _ = node.send(Msg::SnapshotStatus { to, ok: false });
                    }
                }
            }
        }
    });
    tx
}

/// The peer service of one node.
pub(crate) struct RaftService {
    pub(crate) core: Arc<Core>,
}

/// Forwarded calls that reach a node that is not the leader say so with this
/// code, so the sender looks for the leader again.
pub(crate) const NOT_LEADER: tonic::Code = tonic::Code::FailedPrecondition;

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn step(
        &self,
        r: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let msg = Message::parse_from_bytes(&r.into_inner().message)
            .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))?;
        self.core
            .send(Msg::Step(Box::new(msg)))
            .map_err(to_status)?;
        Ok(Response::new(pb::StepResponse {}))
    }

    async fn propose(
        &self,
        r: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        match self.core.propose_local(r.into_inner().command).await {
            Ok(a) => Ok(Response::new(pb::ProposeResponse {
                revision: a.revision,
                succeeded: a.succeeded,
                lease: a.lease,
            })),
            Err(ProposeError::NotLeader) => Err(Status::new(NOT_LEADER, "not the leader")),
            Err(ProposeError::Store(e)) => Err(to_status(e)),
        }
    }

    async fn lease_keep_alive(
        &self,
        r: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::KeepAliveResponse>, Status> {
        match self.core.keepalive_local(r.into_inner().id).await {
            Ok(()) => Ok(Response::new(pb::KeepAliveResponse {})),
            Err(ProposeError::NotLeader) => Err(Status::new(NOT_LEADER, "not the leader")),
            Err(ProposeError::Store(e)) => Err(to_status(e)),
        }
    }
}
