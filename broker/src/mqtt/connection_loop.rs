//! A connection's life after the handshake: wait for whatever comes (a read, the router, the
//! hub's mailbox, a commit, the timer), then do that wake-up's work. Only the wait lives in the
//! connection's task; what is rarely needed is boxed where it is awaited.

use super::*;

/// The next router notification, or never while the connection has no link. The link's
/// own future (about 300 bytes) is boxed so connections without a link, most of a fleet,
/// do not carry room for it.
pub(super) async fn next_notification(
    rx: &mut Option<Box<LinkRx>>,
) -> Box<Result<Option<Notification>, rumqttd::local::LinkError>> {
    match rx {
        Some(rx) => Box::new(Box::pin(rx.next()).await),
        None => std::future::pending().await,
    }
}

/// Waits for the oldest pending commit and takes it off the queue.
pub(super) async fn next_commit(
    commits: &mut std::collections::VecDeque<PendingCommit>,
) -> Option<(
    Result<(), fleethub_router::queue::AppendError>,
    PendingCommit,
)> {
    let result = (&mut commits.front_mut()?.committed).await;
    commits.pop_front().map(|batch| (result, batch))
}

pub(super) fn write_acks(acks: &[u16], wbuf: &mut BytesMut) {
    for pkid in acks {
        let ack = PubAck {
            pkid: *pkid,
            reason: PubAckReason::Success,
        };
        let _ = V4.write(Packet::PubAck(ack, None), wbuf);
    }
}

impl Session {
    pub(super) async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        token_deadline: Option<Instant>,
    ) -> Result<std::convert::Infallible, &'static str>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mailbox = self.mailbox.clone();
        let hub = self.hub.clone();
        let mut deadline = Instant::now() + self.keep_alive.unwrap_or(FAR);
        let token_deadline = token_deadline.unwrap_or_else(|| Instant::now() + FAR);
        // Batches whose routed messages are being committed, oldest first, with the PUBACKs
        // that wait for them. The connection keeps reading meanwhile (pipelining); acks go
        // out when their batch is committed, so always in the order publishes came in.
        let mut commits: std::collections::VecDeque<PendingCommit> =
            std::collections::VecDeque::new();
        let mut link_rx: Option<Box<LinkRx>> = None;
        let mut read_size = ReadSize::new();
        // Made once per connection, not once per wake-up: registering a timer takes a lock
        // shared with other connections. It is moved only when it fires early (the
        // keep-alive deadline moves with every read).
        let timer = tokio::time::sleep_until(deadline.min(token_deadline));
        tokio::pin!(timer);
        loop {
            // What each wake-up brought: decode, route, acknowledge, write. Its rarely needed
            // parts (router hand-off and notifications) are boxed where they are awaited, so
            // an idle connection's task stays small; this part runs inline because boxing it
            // per wake-up cost a fifth of the routed throughput.
            self.work(
                writer,
                rbuf,
                wbuf,
                &mut commits,
                &mut link_rx,
                &mut deadline,
            )
            .await?;
            // After the work, so what was read is handled and acknowledged first.
            if hub.is_stopping() {
                return Err("hub shutting down");
            }
            let room = read_size.prepare(rbuf);
            // Holding too much unstored: leave the socket unread until the store takes it.
            let reading = !self.held_publishes.as_ref().is_some_and(|h| h.full());
            let woke = tokio::select! {
                read = reader.read_buf(rbuf), if reading => match read {
                    Ok(0) | Err(_) => return Err("socket closed"),
                    Ok(n) => {
                        read_size.read(n, room);
                        Wake::Read
                    }
                },
                notification = next_notification(&mut link_rx) => Wake::Router(notification),
                _ = mailbox.ready() => Wake::Mailbox,
                done = next_commit(&mut commits), if !commits.is_empty() => Wake::Committed(done),
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= token_deadline {
                        // As IoT Hub: the SDKs renew by reconnecting before this.
                        self.hub.metrics.token_expirations.inc();
                        return Err("SAS token expired");
                    }
                    if now >= deadline {
                        return Err("keep-alive expired");
                    }
                    match self.held_publishes.as_ref().and_then(|h| h.retry_at) {
                        Some(at) if now >= at => Wake::Retry,
                        _ => Wake::Timer,
                    }
                }
            };
            let retry_at = self.held_publishes.as_ref().and_then(|h| h.retry_at);
            let timer_fired = matches!(woke, Wake::Timer | Wake::Retry);
            match woke {
                // Read into `rbuf`: decoded by `work` at the top of the loop.
                Wake::Read => {}
                // Fired for a keep-alive deadline that has moved since.
                Wake::Timer => {}
                Wake::Retry => {
                    if commits.is_empty() {
                        if let Some(h) = self.held_publishes.take() {
                            self.offer_again(*h, &mut commits);
                        }
                    } else if let Some(h) = self.held_publishes.as_mut() {
                        // Wait for what is in flight: the retry goes after it.
                        h.retry_at = Some(Instant::now() + Held::RETRY / 5);
                    }
                }
                Wake::Router(first) => {
                    Box::pin(self.router_notifications(*first, writer, wbuf, &mut link_rx)).await?
                }
                Wake::Mailbox => {
                    if mailbox.kicked() {
                        return Err(
                            "closed by the hub (taken over, disabled, deleted or stopping)",
                        );
                    }
                    // Everything waiting, in one go.
                    for d in mailbox.take() {
                        self.on_direct(d, wbuf);
                    }
                    if mailbox.take_c2d() {
                        self.c2d_fill(wbuf);
                    }
                    if mailbox.take_inputs() {
                        // New entries, possibly of a higher priority than the cursors.
                        if let Some(inputs) = self.inputs.as_mut() {
                            inputs.reader.rewind();
                        }
                        self.inputs_fill(wbuf);
                        self.events_fill(wbuf);
                    }
                }
                Wake::Committed(done) => {
                    let mut refused = None;
                    if let Some((result, batch)) = done {
                        refused = self.commit_done(result, batch, wbuf).err();
                    }
                    // Later batches may be committed too: the writer answers in order.
                    while refused.is_none() {
                        let Some(front) = commits.front_mut() else {
                            break;
                        };
                        match (&mut front.committed).now_or_never() {
                            Some(result) => {
                                if let Some(batch) = commits.pop_front() {
                                    refused = self.commit_done(result, batch, wbuf).err();
                                }
                            }
                            None => break,
                        }
                    }
                    if let Some(reason) = refused {
                        // What earlier batches acknowledged goes out first, in order.
                        let _ = write_all(writer, wbuf).await;
                        return Err(reason);
                    }
                }
            }
            // The one timer serves keep-alive, token expiry and the held publishes' retry:
            // moved when it fired, or when a retry was set or taken since.
            let next_retry = self.held_publishes.as_ref().and_then(|h| h.retry_at);
            if timer_fired || next_retry != retry_at {
                let at = deadline.min(token_deadline);
                timer.as_mut().reset(next_retry.map_or(at, |r| r.min(at)));
            }
        }
    }

    /// One wake-up's work: write what is pending, decode and handle every complete packet
    /// read, stage their acknowledgements behind the routed messages' commit, write again.
    pub(super) async fn work<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        commits: &mut std::collections::VecDeque<PendingCommit>,
        link_rx: &mut Option<Box<LinkRx>>,
        deadline: &mut Instant,
    ) -> Result<(), &'static str> {
        write_all(writer, wbuf).await.map_err(|_| "write failed")?;
        // Packets may already be buffered (read together with CONNECT).
        match self.drain_input(rbuf, wbuf).await {
            Ok(true) => *deadline = Instant::now() + self.keep_alive.unwrap_or(FAR),
            Ok(false) => {}
            Err(reason) => {
                // Acks read before the bad packet still count: no redelivery for them.
                self.inputs_acked_flush(wbuf);
                let _ = write_all(writer, wbuf).await;
                return Err(reason);
            }
        }
        self.inputs_acked_flush(wbuf);
        self.stage_acks(commits, wbuf);
        write_all(writer, wbuf).await.map_err(|_| "write failed")?;
        if let Some(rx) = self.new_link_rx.take() {
            *link_rx = Some(rx);
        }
        Ok(())
    }

    /// Handles `first` and everything else the router has queued for this link, in one go.
    pub(super) async fn router_notifications<W: AsyncWrite + Unpin>(
        &mut self,
        first: Result<Option<Notification>, rumqttd::local::LinkError>,
        writer: &mut W,
        wbuf: &mut BytesMut,
        link_rx: &mut Option<Box<LinkRx>>,
    ) -> Result<(), &'static str> {
        let mut unscheduled = false;
        let mut next = first;
        loop {
            match next {
                Ok(Some(n)) => match self.on_notification(n, wbuf).await {
                    Some(Outcome::Unscheduled) => unscheduled = true,
                    Some(Outcome::Close) => return Err("closed by router"),
                    None => {}
                },
                Ok(None) => break,
                Err(_) => return Err("router link closed"),
            }
            next = match link_rx.as_mut().and_then(|rx| rx.next().now_or_never()) {
                Some(n) => n,
                None => break,
            };
        }
        write_all(writer, wbuf).await.map_err(|_| "write failed")?;
        if let (true, Some(rx)) = (unscheduled, link_rx.as_mut()) {
            rx.wake().await.map_err(|_| "router link closed")?;
        }
        Ok(())
    }

    /// Hands this batch's routed messages to the queue writer (not waiting) and parks its
    /// PUBACKs behind the commit; with nothing to commit and nothing pending, acks go now.
    /// While publishes are held, the batch waits behind them instead.
    pub(super) fn stage_acks(
        &mut self,
        commits: &mut std::collections::VecDeque<PendingCommit>,
        wbuf: &mut BytesMut,
    ) {
        let acks = std::mem::take(&mut self.deferred_acks);
        if let Some(h) = self.held_publishes.as_mut() {
            if acks.is_empty() && self.queued.is_empty() {
                return;
            }
            let crate::hub::Routed { entries, sinks } = std::mem::take(&mut self.queued);
            let count = entries.len() as u64;
            h.waiting_count += count.max(acks.len() as u64);
            h.waiting.push_back(HeldBatch {
                entries,
                acks,
                sinks,
                count,
                fresh: count,
            });
            return;
        }
        if self.queued.is_empty() {
            if commits.is_empty() {
                write_acks(&acks, wbuf);
            } else if let Some(last) = commits.back_mut() {
                last.acks.extend(acks);
            }
            return;
        }
        let crate::hub::Routed { entries, sinks } = std::mem::take(&mut self.queued);
        let count = entries.len() as u64;
        let committed = self.hub.append(entries);
        commits.push_back(PendingCommit {
            committed,
            acks,
            sinks,
            count,
            fresh: count,
        });
    }

    /// Offers everything held to the store again, as one batch behind nothing.
    pub(super) fn offer_again(
        &mut self,
        held: Held,
        commits: &mut std::collections::VecDeque<PendingCommit>,
    ) {
        let HeldBatch {
            entries,
            acks,
            sinks,
            count,
            fresh,
        } = held.into_batch();
        let committed = if entries.is_empty() {
            Box::pin(std::future::ready(Ok(()))) as fleethub_router::queue::AppendFuture
        } else {
            self.hub.append(entries)
        };
        commits.push_back(PendingCommit {
            committed,
            acks,
            sinks,
            count,
            fresh,
        });
    }

    /// A batch's routed messages are stored: release its PUBACKs, unless publishes before
    /// it are held (then its acks wait behind them). Refused (the `refuse` quota policy, the
    /// disk at its free-space floor): nothing of it is acknowledged; it is held on the
    /// connection with its acks and offered again until the store takes it, so the device
    /// stays connected and gets its PUBACKs, in order, once there is room. A store error
    /// closes the connection: an MQTT 3.1.1 client sends unacknowledged QoS 1 publishes again
    /// when it reconnects.
    pub(super) fn commit_done(
        &mut self,
        result: Result<(), fleethub_router::queue::AppendError>,
        batch: PendingCommit,
        wbuf: &mut BytesMut,
    ) -> Result<(), &'static str> {
        match result {
            Ok(()) => {
                self.hub.sinks.wake(&batch.sinks);
                match self.held_publishes.as_mut() {
                    None => write_acks(&batch.acks, wbuf),
                    Some(h) => h.refused.push_back(HeldBatch {
                        entries: Vec::new(),
                        acks: batch.acks,
                        sinks: Vec::new(),
                        count: 0,
                        fresh: 0,
                    }),
                }
                Ok(())
            }
            Err(e) if e.is_refusal() => {
                self.hub.metrics.queue_refused.inc_by(batch.fresh);
                let h = self.held_publishes.get_or_insert_with(|| {
                    debug!(error = %e.error, "routed publishes held until the store takes them");
                    Box::default()
                });
                h.retry_at
                    .get_or_insert_with(|| Instant::now() + Held::RETRY);
                h.refused.push_back(HeldBatch {
                    entries: e.entries,
                    acks: batch.acks,
                    sinks: batch.sinks,
                    count: batch.count,
                    fresh: 0,
                });
                Ok(())
            }
            Err(e) => {
                self.hub.metrics.queue_refused.inc_by(batch.fresh);
                warn!(error = %e, "could not queue routed messages");
                Err("routed messages could not be stored: to be sent again on reconnect")
            }
        }
    }
}
