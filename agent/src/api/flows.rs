//! `Flows`: the agent's flow events as a server stream — the recent ones a filter matches,
//! then, when following, new ones as they come.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ferrovia_proto::v1;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::Status;

use crate::flows::{FlowFilter, FlowHub};

/// Where the agent's flow events are (none when they were not started).
pub trait FlowFeed: Send + Sync + 'static {
    fn flow_hub(&self) -> impl Future<Output = Option<Arc<FlowHub>>> + Send;
}

/// The `Flows` answer.
pub type FlowStream = Pin<Box<dyn Stream<Item = Result<v1::FlowEvent, Status>> + Send + 'static>>;

/// The stream `req` asks for from `hub`; a bad filter is `INVALID_ARGUMENT` naming its field.
pub fn stream(hub: Option<Arc<FlowHub>>, req: &v1::FlowsRequest) -> Result<FlowStream, Status> {
    let filter = FlowFilter::parse(req).map_err(Status::invalid_argument)?;
    let hub = hub.ok_or_else(|| Status::unavailable("flow events are off on this agent"))?;
    let last = usize::try_from(req.last).unwrap_or(usize::MAX);
    let (recent, rx) = hub.subscribe(&filter, last, req.follow);
    let recent = tokio_stream::iter(recent.into_iter().map(|ev| Ok((*ev).clone())));
    let Some(mut rx) = rx else {
        return Ok(Box::pin(recent));
    };
    let live = async_stream(move |tx| async move {
        loop {
            let received = tokio::select! {
                // The client went: stop now, not at the next matching event.
                () = tx.closed() => return,
                received = rx.recv() => received,
            };
            match received {
                Ok(ev) if filter.matches(&ev) => {
                    if tx.send(Ok((*ev).clone())).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        lost = n,
                        "a Flows follower fell behind; oldest events skipped"
                    );
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(Box::pin(tokio_stream::StreamExt::chain(recent, live)))
}

/// A stream fed by a task through a small channel: the task stops when the client goes.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<v1::FlowEvent, Status>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::FlowEvent, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One event as a JSON object, with the proto's field names (`ferrovia flows -o json` prints
/// one per line).
#[must_use]
pub fn flow_json(ev: &v1::FlowEvent) -> serde_json::Value {
    serde_json::json!({
        "time_unix_nano": ev.time_unix_nano,
        "type": ev.r#type,
        "direction": ev.direction,
        "namespace": ev.namespace,
        "pod": ev.pod,
        "protocol": ev.protocol,
        "source": ev.source,
        "source_port": ev.source_port,
        "source_pod": ev.source_pod,
        "destination": ev.destination,
        "destination_port": ev.destination_port,
        "destination_pod": ev.destination_pod,
        "verdict": ev.verdict,
        "policy_reason": ev.policy_reason,
        "drop_reason": ev.drop_reason,
        "service_address": ev.service_address,
        "service_port": ev.service_port,
        "service": ev.service,
        "service_port_name": ev.service_port_name,
        "suppressed": ev.suppressed,
        "policy_direction": ev.policy_direction,
    })
}

/// One event as a line for people: time, where, what, the flow (pods named), the service it
/// went through, and the verdict.
#[must_use]
pub fn flow_line(ev: &v1::FlowEvent) -> String {
    use std::fmt::Write as _;
    let secs = ev.time_unix_nano / 1_000_000_000;
    let millis = (ev.time_unix_nano / 1_000_000) % 1000;
    let end = |addr: &str, port: u32, pod: &str| {
        let at = if port == 0 {
            addr.to_owned()
        } else {
            format!("{addr}:{port}")
        };
        if pod.is_empty() {
            at
        } else {
            format!("{at} ({pod})")
        }
    };
    // Addressed to a frontend and not translated (yet): the destination is the service.
    let translated = !ev.service_address.is_empty()
        && (ev.service_address != ev.destination || ev.service_port != ev.destination_port);
    let destination_name = if ev.service_address.is_empty() || translated {
        &ev.destination_pod
    } else {
        &ev.service
    };
    let mut line = format!(
        "{:02}:{:02}:{:02}.{millis:03} {:<7} {}/{} {:<14} {} {} -> {}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ev.direction,
        ev.namespace,
        ev.pod,
        ev.r#type,
        ev.protocol,
        end(&ev.source, ev.source_port, &ev.source_pod),
        end(&ev.destination, ev.destination_port, destination_name),
    );
    // Writing to a String cannot fail.
    if translated {
        let _ = write!(line, " via {}:{}", ev.service_address, ev.service_port);
        if !ev.service.is_empty() {
            let _ = write!(line, " {}", ev.service);
        }
    }
    if !ev.verdict.is_empty() {
        let _ = write!(line, " {} ({}", ev.verdict, ev.policy_reason);
        if ev.policy_direction != ev.direction {
            let _ = write!(line, " at {}", ev.policy_direction);
        }
        line.push(')');
    }
    if !ev.drop_reason.is_empty() {
        let _ = write!(line, " dropped ({})", ev.drop_reason);
    }
    if ev.suppressed > 0 {
        let _ = write!(line, " [+{} suppressed]", ev.suppressed);
    }
    line
}
