// The transactional outbox both plugins share: a hook only writes its event as a row of the
// app's own database (fast, no network), and a background relay publishes the rows to JetStream
// oldest first, deleting each on JetStream's acknowledgement. NATS being down never fails nor
// slows the app's write; the rows wait, survive a restart, and go out in order once it is back.
import type { Envelope, Logger } from "./index.js";

/** One event waiting to be published. */
export interface OutboxRow {
  /** The event id: the row's key and the `Nats-Msg-Id`. */
  id: string;
  subject: string;
  /** The envelope, as JSON. */
  body: string;
  /** Where the row stands in publish order (see `nextPosition`). */
  position: number;
  /** When it was written (ms since the epoch). */
  createdAt: number;
}

/** Where an app keeps its outbox rows (a table of its own database). */
export interface OutboxStore {
  /** The first `limit` rows in publish order (lowest `position` first). */
  oldest(limit: number): Promise<OutboxRow[]>;
  /** Removes a published row (a missing one is no error). */
  remove(id: string): Promise<void>;
  /** How many rows wait. */
  count(): Promise<number>;
}

/** Publishes one row and resolves once JetStream stored it (or knew it already); throws why not. */
export type PublishRow = (subject: string, id: string, body: string) => Promise<void>;

/** What the outbox holds and did, for gauges. */
export interface OutboxStats {
  /** Rows waiting to be published. */
  pending: number;
  /** Age of the oldest waiting row (ms); 0 when none waits. */
  oldestAgeMs: number;
  /** Rows published and removed by this process. */
  published: number;
  /** Failed publish attempts (each is retried). */
  failed: number;
  lastError?: string;
}

/** Rows read per pass. */
export const OUTBOX_BATCH_MAX = 100;
/** First retry delay after a failed publish; it doubles up to OUTBOX_RETRY_MAX_MS. */
export const OUTBOX_RETRY_MIN_MS = 100;
export const OUTBOX_RETRY_MAX_MS = 5_000;
/** How often an idle relay looks for rows written by another process (or left by a crash). */
export const OUTBOX_POLL_MS = 1_000;

let lastPosition = 0;

/**
 * A position after every one this process gave: microseconds since the epoch, bumped past the
 * last one, so rows written in one process keep their order even within a millisecond.
 */
export function nextPosition(now = Date.now()): number {
  lastPosition = Math.max(now * 1000, lastPosition + 1);
  return lastPosition;
}

/** The row a hook writes for `envelope` on `subject`. */
export function outboxRow(subject: string, envelope: Envelope): OutboxRow {
  return {
    id: envelope.id,
    subject,
    body: JSON.stringify(envelope),
    position: nextPosition(),
    createdAt: Date.now(),
  };
}

/**
 * The background publisher: reads the oldest rows and publishes them one after the other, so
 * each user's events reach JetStream in the order they were written. The first failure stops the
 * pass (nothing behind it may overtake it) and the pass is tried again after a backoff.
 * A row published but not yet removed when the process dies is published again under the same
 * `Nats-Msg-Id`: JetStream drops it within its duplicate window and the engine by its event id.
 */
export class OutboxRelay {
  private running?: Promise<void>;
  /** A write woke the relay during a pass, which may have read the rows before it. */
  private again = false;
  private timer?: ReturnType<typeof setTimeout>;
  private retryMs = 0;
  private closed = false;
  private published = 0;
  private failed = 0;
  private lastError?: string;

  constructor(
    private readonly store: () => Promise<OutboxStore>,
    private readonly publish: PublishRow,
    private readonly logger: Logger,
  ) {}

  /**
   * Starts the periodic pass; the first comes after OUTBOX_POLL_MS (rows an earlier run left),
   * so that the app's migrations have made the table by then. A write wakes it at once.
   */
  start(): void {
    this.schedule();
  }

  /** Runs a pass soon: after a write, or when the app knows NATS is back. */
  wake(): void {
    if (this.closed) return;
    if (this.running) {
      this.again = true;
      return;
    }
    if (this.retryMs > 0 && this.timer) return; // backing off: the timer will run it
    this.again = false;
    this.running = this.pass().finally(() => {
      this.running = undefined;
      if (this.again && this.retryMs === 0) this.wake();
      else this.schedule();
    });
  }

  /** Waits for a pass in progress; then no new one starts. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await this.running;
  }

  /** Gauges: rows waiting and the oldest one's age, with this process's counters. */
  async stats(): Promise<OutboxStats> {
    const store = await this.store();
    const [pending, oldest] = await Promise.all([store.count(), store.oldest(1)]);
    return {
      pending,
      oldestAgeMs: oldest[0] ? Math.max(0, Date.now() - oldest[0].createdAt) : 0,
      published: this.published,
      failed: this.failed,
      lastError: this.lastError,
    };
  }

  /** Resolves once nothing waits (for tests and graceful shutdowns); false on timeout. */
  async drained(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if ((await (await this.store()).count()) === 0) return true;
      this.wake();
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return false;
  }

  private schedule(): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    const delay = this.retryMs > 0 ? this.retryMs : OUTBOX_POLL_MS;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.wake();
    }, delay);
    this.timer.unref?.();
  }

  private async pass(): Promise<void> {
    try {
      const store = await this.store();
      for (;;) {
        const rows = await store.oldest(OUTBOX_BATCH_MAX);
        for (const row of rows) {
          if (this.closed) return;
          await this.publish(row.subject, row.id, row.body);
          await store.remove(row.id);
          this.published += 1;
          this.resumed();
        }
        if (rows.length < OUTBOX_BATCH_MAX) return;
      }
    } catch (error) {
      this.backOff(error instanceof Error ? error.message : String(error));
    }
  }

  private resumed(): void {
    if (this.retryMs === 0) return;
    this.retryMs = 0;
    this.logger.info("[sync-engine] outbox: NATS answers again; publishing the waiting events");
  }

  private backOff(reason: string): void {
    this.failed += 1;
    this.lastError = reason;
    const first = this.retryMs === 0;
    this.retryMs = Math.min(OUTBOX_RETRY_MAX_MS, Math.max(OUTBOX_RETRY_MIN_MS, this.retryMs * 2));
    if (first) {
      this.logger.warn(`[sync-engine] outbox: publishing paused (${reason}); the events wait in the app's database and are retried in order`);
    }
  }
}
