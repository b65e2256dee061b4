// @sync-engine/common: what @sync-engine/better-auth and @sync-engine/payload share. The wire
// contract is docs/PROTOCOL.md: envelopes on NATS JetStream, Standard Webhooks deliveries from the engine.
import { createHash, randomUUID } from "node:crypto";
import { connect, type ConnectionOptions, type NatsConnection } from "nats";
import { Webhook } from "standardwebhooks";
export * from "./outbox.js";

export type EventType = "user.created" | "user.updated" | "user.deleted";
export type Origin = "better-auth" | "payload";

/** One change event (PROTOCOL.md §1). */
export interface Envelope {
  id: string;
  origin: Origin;
  type: EventType;
  timestamp: number;
  data: Record<string, unknown>;
}

export const EVENT_TYPES: readonly EventType[] = ["user.created", "user.updated", "user.deleted"];
/** Event ids: 1–128 of A-Za-z0-9_:- (no dot: Standard Webhooks uses it as a separator). */
export const EVENT_ID_PATTERN = /^[A-Za-z0-9_:-]{1,128}$/;
/** Ids used as their own subject token: printable ASCII without `.`, `*` or `>`, 1–128 long. */
const PLAIN_TOKEN_PATTERN = /^[\x21-\x7e]{1,128}$/;
const NOT_IN_A_TOKEN = /[.*>]/;

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export const consoleLogger: Logger = {
  info: (m) => console.info(m),
  warn: (m) => console.warn(m),
  error: (m) => console.error(m),
};

/** A new event id: a UUID, which matches EVENT_ID_PATTERN. */
export function newEventId(): string {
  return randomUUID();
}

/**
 * The subject token of user `id` (PROTOCOL.md §1, *Partitions*): the id itself when NATS
 * accepts it as a token, otherwise `h` and the first 16 hex digits of its SHA-256. The engine
 * (`protocol::partition::subject_token`) has the same rule and the same test vectors.
 */
export function subjectToken(id: string): string {
  if (PLAIN_TOKEN_PATTERN.test(id) && !NOT_IN_A_TOKEN.test(id)) return id;
  return `h${createHash("sha256").update(id, "utf8").digest("hex").slice(0, 16)}`;
}

/**
 * `prefix` + base + `.<token>`: every subject ends with its user's token, so that the server's
 * partition mapping sends all of one user's events to one partition. An event without a string
 * id (which the engine dead-letters) is given the token of the empty id.
 */
export function subjectFor(prefix: string, base: string, key: unknown): string {
  const normalized = prefix && !prefix.endsWith(".") ? `${prefix}.` : prefix;
  return `${normalized}${base}.${subjectToken(typeof key === "string" ? key : "")}`;
}

/** JSON-ready copy: Dates become ISO strings, undefined values are left out. */
export function toWire(record: Record<string, unknown>, fields?: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(record)) {
    if (fields && !fields.includes(name)) continue;
    if (value === undefined) continue;
    out[name] = value instanceof Date ? value.toISOString() : value;
  }
  return out;
}

export interface PublisherOptions {
  /** NATS server(s), e.g. "nats://127.0.0.1:4222". */
  servers: string | string[];
  /** Extra options for `connect()` of the `nats` package (credentials, TLS, …). */
  connectionOptions?: Partial<ConnectionOptions>;
  /** How long a first connection attempt may take (default 2000 ms). */
  connectTimeoutMs?: number;
  /** How long to wait for JetStream to store one event (default 5000 ms). */
  publishTimeoutMs?: number;
  logger?: Logger;
  /** Name of the NATS connection (shows in the server's monitoring). */
  name?: string;
}

export interface PublisherStats {
  /** Events JetStream stored. */
  published: number;
  /** Events that could not be published (logged; the app's write was kept). */
  failed: number;
  lastError?: string;
}

/**
 * Publishes envelopes with JetStream (`Nats-Msg-Id` = event id). Connects lazily and reconnects
 * by itself; a failure never throws: it is logged and counted, and the caller's write stands.
 */
export class Publisher {
  readonly stats: PublisherStats = { published: 0, failed: 0 };
  private connection?: Promise<NatsConnection>;
  private readonly logger: Logger;
  private closed = false;

  constructor(private readonly options: PublisherOptions) {
    this.logger = options.logger ?? consoleLogger;
  }

  private connect(): Promise<NatsConnection> {
    if (this.connection) return this.connection;
    const attempt = connect({
      servers: this.options.servers,
      timeout: this.options.connectTimeoutMs ?? 2000,
      reconnect: true,
      maxReconnectAttempts: -1,
      name: this.options.name,
      ...this.options.connectionOptions,
    });
    this.connection = attempt;
    attempt.then(
      (nc) => {
        void nc.closed().then(() => {
          if (this.connection === attempt) this.connection = undefined;
        });
      },
      () => {
        // The next publish tries again.
        if (this.connection === attempt) this.connection = undefined;
      },
    );
    return attempt;
  }

  /** Publishes one envelope; true once JetStream stored it (or knew it already). */
  async publish(subject: string, envelope: Envelope): Promise<boolean> {
    try {
      await this.send(subject, envelope.id, JSON.stringify(envelope));
      return true;
    } catch (error) {
      return this.fail(subject, envelope, error);
    }
  }

  /**
   * Publishes one body with `Nats-Msg-Id` = `id` and waits for JetStream's acknowledgement;
   * throws an Error saying why not (unreachable, no stream, timeout).
   */
  async send(subject: string, id: string, body: string): Promise<void> {
    try {
      if (this.closed) throw new Error("publisher is closed");
      const nc = await this.connect();
      await nc.jetstream().publish(subject, body, {
        msgID: id,
        timeout: this.options.publishTimeoutMs ?? 5000,
      });
      this.stats.published += 1;
    } catch (error) {
      const message = describeNatsError(error);
      this.stats.failed += 1;
      this.stats.lastError = message;
      throw new Error(message);
    }
  }

  private fail(subject: string, envelope: Envelope, error: unknown): false {
    const message = error instanceof Error ? error.message : String(error);
    const servers = [this.options.servers].flat().join(", ");
    this.logger.error(
      `[sync-engine] could not publish ${envelope.type} ${envelope.id} on "${subject}" to NATS (${servers}): ` +
        `${message}. The application's write was kept; \`sync-engine reconcile\` publishes the missing events.`,
    );
    return false;
  }

  /** Drains and closes the NATS connection. */
  async close(): Promise<void> {
    this.closed = true;
    const connection = this.connection;
    this.connection = undefined;
    if (!connection) return;
    try {
      const nc = await connection;
      await nc.drain();
    } catch {
      // never connected: nothing to close
    }
  }
}

function describeNatsError(error: unknown): string {
  const code = (error as { code?: string } | null)?.code;
  const text = error instanceof Error ? error.message : String(error);
  if (code === "503" || /no responders/i.test(text)) {
    return `no JetStream stream captures this subject (${text}); is the engine configured for it and has it run once?`;
  }
  if (code === "CONNECTION_REFUSED" || /ECONNREFUSED|CONNECTION_REFUSED/i.test(text)) {
    return `NATS is unreachable (${text})`;
  }
  if (code === "TIMEOUT" || /timeout/i.test(text)) {
    return `NATS did not answer in time (${text})`;
  }
  return text;
}

/** Remembers applied delivery ids (`webhook-id`), the receivers' idempotency key. */
export interface DeliveryLog {
  has(id: string): boolean | Promise<boolean>;
  add(id: string): void | Promise<void>;
}

/** In-memory DeliveryLog: each id is kept `ttlMs` (48 h), the oldest forgotten beyond `capacity`. */
export class MemoryDeliveryLog implements DeliveryLog {
  private readonly ids = new Map<string, number>();
  constructor(
    private readonly capacity = 100_000,
    private readonly ttlMs = 48 * 3600 * 1000,
  ) {}
  has(id: string): boolean {
    const expires = this.ids.get(id);
    if (expires === undefined) return false;
    if (expires < Date.now()) {
      this.ids.delete(id);
      return false;
    }
    return true;
  }
  add(id: string): void {
    this.ids.delete(id);
    this.ids.set(id, Date.now() + this.ttlMs);
    while (this.ids.size > this.capacity) {
      const oldest = this.ids.keys().next().value as string;
      this.ids.delete(oldest);
    }
  }
}

/** Secrets from an option or an env var: one, or several separated by spaces (rotation). */
export function resolveSecrets(option: string | string[] | undefined, envVar: string): string[] {
  const raw = option ?? process.env[envVar];
  const secrets = [raw ?? []].flat().flatMap((s) => s.split(/\s+/)).filter(Boolean);
  if (secrets.length === 0) {
    throw new Error(
      `[sync-engine] no webhook secret: pass \`secret\` or set ${envVar} (the engine's secret_env value, whsec_<base64>)`,
    );
  }
  return secrets;
}

/** Thrown by an apply function for a delivery that can never succeed (answered 400). */
export class BadDelivery extends Error {}

export interface ReceiveResult {
  status: number;
  body: Record<string, unknown>;
}

export type Apply = (envelope: Envelope, webhookId: string) => Promise<string>;

export interface Receiver {
  /** Verifies, deduplicates and applies one delivery. Never throws. */
  receive(rawBody: string, headers: Headers, apply: Apply): Promise<ReceiveResult>;
}

/**
 * The engine's deliveries (PROTOCOL.md §3): Standard Webhooks signature (401 when wrong),
 * envelope checks (400), deduplication on `webhook-id` (200 without applying again), then
 * `apply` (200, or 500 so that the engine retries).
 */
export function createReceiver(options: {
  secrets: string[];
  log: DeliveryLog;
  logger: Logger;
}): Receiver {
  const verifiers = options.secrets.map((secret) => {
    try {
      return new Webhook(secret);
    } catch (error) {
      throw new Error(`[sync-engine] invalid webhook secret (expected whsec_<base64>): ${String(error)}`);
    }
  });
  const inFlight = new Map<string, Promise<ReceiveResult>>();

  async function handle(envelope: Envelope, webhookId: string, apply: Apply): Promise<ReceiveResult> {
    if (await options.log.has(webhookId)) return { status: 200, body: { ok: true, result: "duplicate" } };
    try {
      const result = await apply(envelope, webhookId);
      await options.log.add(webhookId);
      return { status: 200, body: { ok: true, result } };
    } catch (error) {
      if (error instanceof BadDelivery) {
        options.logger.warn(`[sync-engine] delivery ${webhookId} refused: ${error.message}`);
        return { status: 400, body: { ok: false, error: error.message } };
      }
      const message = error instanceof Error ? error.message : String(error);
      options.logger.error(`[sync-engine] delivery ${webhookId} failed (the engine will retry): ${message}`);
      return { status: 500, body: { ok: false, error: "apply failed" } };
    }
  }

  return {
    async receive(rawBody, headers, apply) {
      const signed = {
        "webhook-id": headers.get("webhook-id") ?? "",
        "webhook-timestamp": headers.get("webhook-timestamp") ?? "",
        "webhook-signature": headers.get("webhook-signature") ?? "",
      };
      if (!signed["webhook-id"] || !signed["webhook-timestamp"] || !signed["webhook-signature"]) {
        return { status: 401, body: { ok: false, error: "missing webhook-id, webhook-timestamp or webhook-signature" } };
      }
      const verified = verifiers.some((wh) => {
        try {
          wh.verify(rawBody, signed);
          return true;
        } catch {
          return false;
        }
      });
      if (!verified) {
        options.logger.warn(`[sync-engine] delivery ${signed["webhook-id"].slice(0, 140)} refused: bad signature or timestamp`);
        return { status: 401, body: { ok: false, error: "invalid signature" } };
      }
      let envelope: Envelope;
      try {
        envelope = parseEnvelope(rawBody);
      } catch (error) {
        return { status: 400, body: { ok: false, error: (error as Error).message } };
      }
      const webhookId = signed["webhook-id"];
      const running = inFlight.get(webhookId);
      if (running) {
        // The same delivery is being applied: answer as that attempt does.
        const result = await running;
        return result.status === 200 ? { status: 200, body: { ok: true, result: "duplicate" } } : result;
      }
      const work = handle(envelope, webhookId, apply);
      inFlight.set(webhookId, work);
      try {
        return await work;
      } finally {
        inFlight.delete(webhookId);
      }
    },
  };
}

function parseEnvelope(rawBody: string): Envelope {
  let value: unknown;
  try {
    value = JSON.parse(rawBody);
  } catch {
    throw new BadDelivery("body is not JSON");
  }
  const envelope = value as Partial<Envelope> | null;
  if (!envelope || typeof envelope !== "object") throw new BadDelivery("body is not a JSON object");
  if (!EVENT_TYPES.includes(envelope.type as EventType)) throw new BadDelivery(`unknown type ${JSON.stringify(envelope.type)}`);
  if (!envelope.data || typeof envelope.data !== "object" || Array.isArray(envelope.data)) {
    throw new BadDelivery("data is not a JSON object");
  }
  return envelope as Envelope;
}

/** The options both plugins take (each adds its own, and documents its subjects and secret). */
export interface SyncOptions {
  /** NATS server(s). Default "nats://127.0.0.1:4222". */
  servers?: string | string[];
  /** Extra `connect()` options of the `nats` package (credentials, TLS, …). */
  connectionOptions?: Partial<ConnectionOptions>;
  /** Prepended to the subjects ("acme" publishes "acme.<subject>"). Default "". */
  subjectPrefix?: string;
  /** The webhook secret(s) of the engine's target (whsec_<base64>; several separated by spaces while rotating). */
  secret?: string | string[];
  /** Fields to publish (the key fields always are). */
  fields?: string[];
  /** Publish the app's own user changes. Default true. */
  publish?: boolean;
  /** Serve the receiver endpoint. Default true. */
  receive?: boolean;
  /** Create a delivered user that does not exist here. Default true. */
  createMissingUsers?: boolean;
  /** Where applied `webhook-id`s are remembered. Default: in memory, 48 h, 100 000 ids. */
  deliveryLog?: DeliveryLog;
  /** How long to wait for JetStream to store an event (ms). Default 5000. */
  publishTimeoutMs?: number;
  logger?: Logger;
}

/** SyncOptions with their defaults applied, and the publisher and receiver they describe. */
export interface SyncSetup {
  logger: Logger;
  prefix: string;
  publishing: boolean;
  receiving: boolean;
  createMissing: boolean;
  publisher: Publisher;
  receiver: Receiver;
}

/**
 * Applies the defaults of SyncOptions and builds the publisher (connection `name`) and the
 * receiver (secret from the option, else env `secretEnv`; required only when receiving).
 * Throws on a missing or invalid secret.
 */
export function setUpSync(options: SyncOptions, plugin: { name: string; secretEnv: string }): SyncSetup {
  const logger = options.logger ?? consoleLogger;
  const receiving = options.receive ?? true;
  const publisher = new Publisher({
    servers: options.servers ?? "nats://127.0.0.1:4222",
    connectionOptions: options.connectionOptions,
    publishTimeoutMs: options.publishTimeoutMs,
    logger,
    name: plugin.name,
  });
  const secrets = receiving ? resolveSecrets(options.secret, plugin.secretEnv) : [];
  const receiver = createReceiver({ secrets, log: options.deliveryLog ?? new MemoryDeliveryLog(), logger });
  return {
    logger,
    prefix: options.subjectPrefix ?? "",
    publishing: options.publish ?? true,
    receiving,
    createMissing: options.createMissingUsers ?? true,
    publisher,
    receiver,
  };
}
