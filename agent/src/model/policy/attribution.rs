//! Which policies and rules decide a new flow at a local pod, for `ferrovia explain`. The maps
//! hold classes and port sets, not names: the names are found again here, from the desired
//! state, with the compiler's own selectors, peers and ports, so that the answer is the one
//! the compiled table gives (the same reason for the same address, exactly).
use std::net::Ipv4Addr;

use ferrovia_common::verdict;

use super::{Dir, Index, Prefix, denial, item_ports, selecting};
use crate::model::{ClusterState, ObjRef, PodIps};

/// A rule of a `NetworkPolicy`: its index in the policy's `ingress` or `egress` list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjRef,
    pub index: usize,
}

/// How the desired state judges a new flow at one pod, in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// The policies selecting the pod for the direction, in name order (empty: not isolated).
    pub isolating: Vec<ObjRef>,
    /// Every rule of those policies that allows the flow, in policy then rule order.
    pub allowing: Vec<RuleRef>,
    /// The `verdict` reason the compiled maps give the flow: `ALLOW_NOT_ISOLATED`,
    /// `ALLOW_RULE`, `DENY_PORT` (a rule selects the peer, none for this port), `DENY_EXCEPT`
    /// (only an `except` covers the peer), or `DENY_NO_RULE`.
    pub reason: u8,
}

impl Judgement {
    #[must_use]
    pub fn allowed(&self) -> bool {
        verdict::allows(self.reason)
    }
}

/// Judges a new flow at local pod `subject` (registered in `local`) for direction `dir`:
/// `peer` is the other end (the destination for egress, the source for ingress), `proto` and
/// `port` the destination's, after service translation.
///
/// A pod the desired state does not have is selected by no policy, as `compile` treats it.
#[must_use]
pub fn judge(
    state: &ClusterState,
    local: &PodIps,
    subject: &ObjRef,
    dir: Dir,
    peer: Ipv4Addr,
    proto: u8,
    port: u16,
) -> Judgement {
    let Some(pod) = state.pods.get(subject) else {
        return Judgement {
            isolating: Vec::new(),
            allowing: Vec::new(),
            reason: verdict::ALLOW_NOT_ISOLATED,
        };
    };
    let isolating: Vec<ObjRef> = selecting(state, subject, pod, dir)
        .into_iter()
        .cloned()
        .collect();
    if isolating.is_empty() {
        return Judgement {
            isolating,
            allowing: Vec::new(),
            reason: verdict::ALLOW_NOT_ISOLATED,
        };
    }
    let index = Index::new(state, local);
    // Named ports resolve on the destination: the subject for ingress, the peer pod for egress.
    let destination = match dir {
        Dir::Ingress => Some(&**pod),
        Dir::Egress => index.by_ip.get(&peer).map(|&i| index.pods[i].pod),
    };
    let mut allowing = Vec::new();
    let (mut selected, mut excepted) = (false, false);
    for policy in &isolating {
        for (i, item) in index.items(policy, dir).iter().enumerate() {
            let (matched, carved) = item.covers(Prefix::host(peer), &index.by_ip);
            excepted |= carved;
            if !matched {
                continue;
            }
            selected = true;
            if item_ports(item, destination).allows(proto, port) {
                allowing.push(RuleRef {
                    policy: policy.clone(),
                    index: i,
                });
            }
        }
    }
    // As `Index::rules` chooses a prefix's reason, then the port trie's answer.
    let reason = if allowing.is_empty() {
        denial(selected, excepted)
    } else {
        verdict::ALLOW_RULE
    };
    Judgement {
        isolating,
        allowing,
        reason,
    }
}
