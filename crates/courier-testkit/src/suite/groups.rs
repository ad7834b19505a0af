//! Tests with several members in one group: competition, crashes, rebalancing.

use super::{create_channel, ids, interleaved, publish, publisher, settle, subscribe, subscriber};
use crate::TransportFactory;
use crate::member::{Journal, Member};
use crate::support::{
    TIMEOUT, assert_per_key_order, collect, collect_acked, group, parse_keyed, unique_channel,
    wait_until,
};
use courier_core::{Message, MessageId};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const PARTITIONS: u32 = 4;

/// Per key, the first processing of each of `ids` happened in publish order.
fn assert_first_times_in_order(journal: &Journal, ids: &HashSet<MessageId>) {
    let firsts: Vec<Message> = journal
        .first_times()
        .into_iter()
        .filter(|s| ids.contains(&s.message.id))
        .map(|s| s.message)
        .collect();
    assert_per_key_order(&firsts);
}

/// Two members of one group on a 4-partition channel, ownership settled: every message
/// goes to exactly one of them, and both get some.
pub async fn competing_consumers(f: &dyn TransportFactory) {
    let caps = f.capabilities();
    let p = publisher(f).await;
    let ch = unique_channel("compete");
    create_channel(f, &ch, PARTITIONS).await;
    let grp = group("compete");
    let journal = Journal::new();
    let (sa, sb) = (subscriber(f).await, subscriber(f).await);
    let a = Member::spawn("a", subscribe(&*sa, &ch, &grp).await, journal.clone());
    let b = Member::spawn("b", subscribe(&*sb, &ch, &grp).await, journal.clone());
    settle(&*p, &ch, &journal, &["a", "b"]).await;

    let sent = interleaved(&ch, 40, 0, 10);
    for batch in sent.chunks(100) {
        publish(&*p, batch).await;
    }
    let want = ids(&sent);
    wait_until(TIMEOUT, "the group processed all 400 messages", || {
        let done = journal.has_all(&want);
        async move { done }
    })
    .await;
    // Everything arrived; give a duplicate (a redelivery bug) a short window to show up
    // before asserting there is none. 100 ms is many heartbeats and fetch rounds here.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut times: HashMap<MessageId, Vec<String>> = HashMap::new();
    for s in journal
        .entries()
        .into_iter()
        .filter(|s| want.contains(&s.message.id))
    {
        times.entry(s.message.id).or_default().push(s.member);
    }
    let dups: Vec<_> = times.iter().filter(|(_, who)| who.len() > 1).collect();
    assert!(
        dups.is_empty(),
        "{} of {} messages were processed more than once with stable ownership, e.g. {:?}",
        dups.len(),
        want.len(),
        dups.iter().take(3).collect::<Vec<_>>()
    );
    let (na, nb) = (
        journal.count_by_among("a", &want),
        journal.count_by_among("b", &want),
    );
    assert!(
        na > 0 && nb > 0,
        "members must share the work: a got {na}, b got {nb}"
    );
    if caps.ordered_per_key {
        assert_first_times_in_order(&journal, &want);
    }
    a.leave().await;
    b.leave().await;
}

/// Member A receives messages, acks only some and crashes; member B, started after,
/// receives every message A left unacknowledged (acked ones may come again).
pub async fn redelivery_after_crash(f: &dyn TransportFactory) {
    let p = publisher(f).await;
    let ch = unique_channel("crash");
    let grp = group("crash");
    let sent = interleaved(&ch, 4, 0, 6);
    let sa = subscriber(f).await;
    let mut sub_a = subscribe(&*sa, &ch, &grp).await;
    publish(&*p, &sent).await;
    let mut unacked = Vec::new();
    let mut left = HashSet::new();
    for (i, d) in collect(&mut sub_a, sent.len(), TIMEOUT)
        .await
        .into_iter()
        .enumerate()
    {
        let id = d
            .message
            .as_ref()
            .map(|m| m.id)
            .unwrap_or_else(|bad| panic!("malformed delivery {bad:?}"));
        // Ack every third delivery, out of order with the others: progress must not
        // skip over the unacknowledged ones in between.
        if i % 3 == 1 {
            d.ack().await.unwrap_or_else(|e| panic!("ack failed: {e}"));
        } else {
            left.insert(id);
            unacked.push(d);
        }
    }
    f.crash(sub_a, unacked).await;
    drop(sa);

    let journal = Journal::new();
    let sb = subscriber(f).await;
    let b = Member::spawn("b", subscribe(&*sb, &ch, &grp).await, journal.clone());
    wait_until(
        TIMEOUT,
        "member b received every message a left unacknowledged",
        || {
            let done = journal.has_all(&left);
            async move { done }
        },
    )
    .await;
    if f.capabilities().ordered_per_key {
        assert_first_times_in_order(&journal, &ids(&sent));
    }
    b.leave().await;
}

/// A member acks everything and leaves cleanly; the next member of the group starts
/// after the acknowledged messages (acks are progress, not just a courtesy).
pub async fn acked_not_redelivered(f: &dyn TransportFactory) {
    let p = publisher(f).await;
    let ch = unique_channel("resume");
    let grp = group("resume");
    let sa = subscriber(f).await;
    let mut sub_a = subscribe(&*sa, &ch, &grp).await;
    let old = interleaved(&ch, 4, 0, 5);
    publish(&*p, &old).await;
    collect_acked(&mut sub_a, old.len(), TIMEOUT).await;
    drop(sub_a);
    drop(sa);

    let sb = subscriber(f).await;
    let mut sub_b = subscribe(&*sb, &ch, &grp).await;
    // Same keys as before: an old message delivered again would come before these.
    let new = interleaved(&ch, 4, 5, 1);
    publish(&*p, &new).await;
    let got = collect_acked(&mut sub_b, new.len(), TIMEOUT).await;
    let again: Vec<_> = got
        .iter()
        .filter(|m| !ids(&new).contains(&m.id))
        .map(parse_keyed)
        .collect();
    assert!(
        again.is_empty(),
        "acknowledged messages were delivered again after a clean leave: {again:?}"
    );
}

/// A consumes alone; B joins while messages keep coming; together they process every
/// message, both take part, and per key the first processing is in order (duplicates
/// during the handover are allowed).
pub async fn rebalance_on_join(f: &dyn TransportFactory) {
    let p = publisher(f).await;
    let ch = unique_channel("join");
    create_channel(f, &ch, PARTITIONS).await;
    let grp = group("join");
    let journal = Journal::new();
    let sa = subscriber(f).await;
    let a = Member::spawn("a", subscribe(&*sa, &ch, &grp).await, journal.clone());

    let mut sent = interleaved(&ch, 10, 0, 10);
    publish(&*p, &sent).await;
    let first = ids(&sent);
    wait_until(TIMEOUT, "a alone processed the first 100 messages", || {
        let done = journal.has_all(&first);
        async move { done }
    })
    .await;

    let sb = subscriber(f).await;
    let b = Member::spawn("b", subscribe(&*sb, &ch, &grp).await, journal.clone());
    // Keep the stream flowing through the handover: publish a batch (one per key), pause
    // briefly (pacing, not synchronisation), until b took part and 20 more batches went
    // out after that — those must be shared by both members.
    let mut seq = 10;
    let mut after_b: Option<HashSet<MessageId>> = None;
    let started = std::time::Instant::now();
    while after_b.as_ref().is_none_or(|ids| ids.len() < 200) {
        assert!(
            started.elapsed() < TIMEOUT,
            "b never received a message after joining"
        );
        let batch = interleaved(&ch, 10, seq, 1);
        seq += 1;
        publish(&*p, &batch).await;
        if let Some(later) = after_b.as_mut() {
            later.extend(ids(&batch));
        } else if journal.count_by("b") > 0 {
            after_b = Some(ids(&batch));
        }
        sent.extend(batch);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let want = ids(&sent);
    wait_until(TIMEOUT, "a and b together processed every message", || {
        let done = journal.has_all(&want);
        async move { done }
    })
    .await;
    let later = after_b.unwrap_or_default();
    let (na, nb) = (
        journal.count_by_among("a", &later),
        journal.count_by_among("b", &later),
    );
    assert!(
        na > 0 && nb > 0,
        "after the rebalance both must work: a got {na}, b got {nb} of the last 200"
    );
    if f.capabilities().ordered_per_key {
        assert_first_times_in_order(&journal, &want);
    }
    a.leave().await;
    b.leave().await;
}

/// A and B share the work; B leaves; A processes the rest: nothing is missing and per
/// key the first processing is in order.
pub async fn rebalance_on_leave(f: &dyn TransportFactory) {
    let p = publisher(f).await;
    let ch = unique_channel("leave");
    create_channel(f, &ch, PARTITIONS).await;
    let grp = group("leave");
    let journal = Journal::new();
    let (sa, sb) = (subscriber(f).await, subscriber(f).await);
    let a = Member::spawn("a", subscribe(&*sa, &ch, &grp).await, journal.clone());
    let b = Member::spawn("b", subscribe(&*sb, &ch, &grp).await, journal.clone());
    settle(&*p, &ch, &journal, &["a", "b"]).await;

    let before = interleaved(&ch, 10, 0, 20);
    publish(&*p, &before).await;
    let first = ids(&before);
    wait_until(TIMEOUT, "a and b processed the first 200 messages", || {
        let done = journal.has_all(&first);
        async move { done }
    })
    .await;
    let nb = journal.count_by_among("b", &first);
    assert!(nb > 0, "b took no part before leaving");
    b.leave().await;
    drop(sb);

    let after = interleaved(&ch, 10, 20, 20);
    publish(&*p, &after).await;
    let rest = ids(&after);
    wait_until(
        TIMEOUT,
        "a processed every message published after b left",
        || {
            let done = journal.has_all(&rest);
            async move { done }
        },
    )
    .await;
    if f.capabilities().ordered_per_key {
        let all: HashSet<_> = first.union(&rest).copied().collect();
        assert_first_times_in_order(&journal, &all);
    }
    a.leave().await;
}
