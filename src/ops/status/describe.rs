//! A consumer group's state and members through librdkafka's `DescribeConsumerGroups`.
//!
//! Why not rust-rdkafka's `fetch_group_list`: it sends the classic DescribeGroups request, to
//! which the broker answers `Dead` with no members for a group on the KIP-848 consumer protocol
//! (`group.protocol=consumer`, which weir's stages can run on); and it panics on a member whose
//! client id is not UTF-8. librdkafka's admin call asks with ConsumerGroupDescribe and falls back
//! to DescribeGroups for classic groups, decoding both kinds of assignment, but rust-rdkafka 0.39
//! does not wrap it: this module is that wrapper, the one place weir calls librdkafka's C API.
//! Every pointer it reads belongs to the result event, which is destroyed only after everything
//! was copied out; every string is read lossily (text from other clients is not trusted to be
//! UTF-8).

use std::{
    ffi::{c_char, CStr, CString},
    time::Duration,
};

use anyhow::bail;
use rdkafka::{bindings as rd, client::Client, ClientContext};

/// A group as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Described {
    /// `Stable`, `PreparingRebalance`, `CompletingRebalance`, `Empty`, `Dead`, `Assigning`,
    /// `Reconciling`, `Unknown` (librdkafka's names).
    pub state: String,
    /// `Consumer` (KIP-848), `Classic`, or `Unknown`.
    pub protocol: String,
    pub members: Vec<DescribedMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DescribedMember {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    /// `(topic, partition)` assigned to it.
    pub assigned: Vec<(String, i32)>,
}

/// Text a librdkafka accessor returned: empty for null.
///
/// # Safety
/// `p` is null or a NUL-terminated string that lives while the result is read.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Destroys what librdkafka allocated for one request, on every way out.
struct Request {
    queue: *mut rd::rd_kafka_queue_t,
    options: *mut rd::rd_kafka_AdminOptions_t,
    event: *mut rd::rd_kafka_event_t,
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or was returned by its constructor and not destroyed yet.
        unsafe {
            if !self.event.is_null() {
                rd::rd_kafka_event_destroy(self.event);
            }
            if !self.options.is_null() {
                rd::rd_kafka_AdminOptions_destroy(self.options);
            }
            if !self.queue.is_null() {
                rd::rd_kafka_queue_destroy(self.queue);
            }
        }
    }
}

/// Describes `group`, waiting at most `timeout` for the broker.
pub(super) fn describe<C: ClientContext>(
    client: &Client<C>,
    group: &str,
    timeout: Duration,
) -> anyhow::Result<Described> {
    let name = CString::new(group).map_err(|_| anyhow::anyhow!("group name {group:?} holds a NUL byte"))?;
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let rk = client.native_ptr();
    // SAFETY: `rk` is a live client for the duration of the call (we hold `client`); the request's
    // objects are destroyed by `Request`'s drop, after the last read of the event's contents.
    unsafe {
        let mut request = Request {
            queue: rd::rd_kafka_queue_new(rk),
            options: rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
            ),
            event: std::ptr::null_mut(),
        };
        if request.queue.is_null() || request.options.is_null() {
            bail!("librdkafka could not create a DescribeConsumerGroups request");
        }
        let mut errstr = [0 as c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(request.options, timeout_ms, errstr.as_mut_ptr(), errstr.len());
        let mut names = [name.as_ptr()];
        rd::rd_kafka_DescribeConsumerGroups(rk, names.as_mut_ptr(), 1, request.options, request.queue);
        // The answer, or librdkafka's own timeout error, comes within the request timeout; the
        // extra second covers its bookkeeping.
        request.event = rd::rd_kafka_queue_poll(request.queue, timeout_ms.saturating_add(1_000));
        if request.event.is_null() {
            bail!("describing group {group}: no answer within {}s", timeout.as_secs());
        }
        if rd::rd_kafka_event_error(request.event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            bail!("describing group {group}: {}", text(rd::rd_kafka_event_error_string(request.event)));
        }
        let result = rd::rd_kafka_event_DescribeConsumerGroups_result(request.event);
        if result.is_null() {
            bail!("describing group {group}: librdkafka returned another kind of result");
        }
        let mut count = 0usize;
        let groups = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut count);
        if groups.is_null() || count == 0 {
            bail!("describing group {group}: the broker returned no group");
        }
        let description = *groups;
        let error = rd::rd_kafka_ConsumerGroupDescription_error(description);
        if !error.is_null() {
            bail!("describing group {group}: {}", text(rd::rd_kafka_error_string(error)));
        }
        let state =
            text(rd::rd_kafka_consumer_group_state_name(rd::rd_kafka_ConsumerGroupDescription_state(description)));
        let protocol =
            text(rd::rd_kafka_consumer_group_type_name(rd::rd_kafka_ConsumerGroupDescription_type(description)));
        let mut members = Vec::new();
        for i in 0..rd::rd_kafka_ConsumerGroupDescription_member_count(description) {
            let m = rd::rd_kafka_ConsumerGroupDescription_member(description, i);
            if m.is_null() {
                continue;
            }
            let mut assigned = Vec::new();
            let assignment = rd::rd_kafka_MemberDescription_assignment(m);
            let list = if assignment.is_null() {
                std::ptr::null()
            } else {
                rd::rd_kafka_MemberAssignment_partitions(assignment)
            };
            if !list.is_null() && !(*list).elems.is_null() {
                for e in std::slice::from_raw_parts((*list).elems, usize::try_from((*list).cnt).unwrap_or(0)) {
                    assigned.push((text(e.topic), e.partition));
                }
            }
            members.push(DescribedMember {
                member_id: text(rd::rd_kafka_MemberDescription_consumer_id(m)),
                client_id: text(rd::rd_kafka_MemberDescription_client_id(m)),
                host: text(rd::rd_kafka_MemberDescription_host(m)),
                assigned,
            });
        }
        Ok(Described { state, protocol, members })
    }
}
