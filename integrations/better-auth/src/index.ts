import { AsyncLocalStorage } from "node:async_hooks";
import type { AuthContext, BetterAuthPlugin } from "better-auth";
import { APIError, createAuthEndpoint } from "better-auth/api";
import {
  BadDelivery,
  newEventId,
  OutboxRelay,
  outboxRow,
  setUpSync,
  subjectFor,
  toWire,
  type Envelope,
  type EventType,
  type OutboxRow,
  type OutboxStats,
  type OutboxStore,
  type PublisherStats,
  type SyncOptions,
} from "@sync-engine/common";

export {
  MemoryDeliveryLog,
  type DeliveryLog,
  type Envelope,
  type Logger,
  type OutboxStats,
  type PublisherStats,
  type SyncOptions,
} from "@sync-engine/common";

/** The outbox table's model name (Better Auth's migrations create it from the plugin schema). */
export const OUTBOX_MODEL = "syncEngineOutbox";

const outboxSchema = {
  [OUTBOX_MODEL]: {
    fields: {
      eventId: { type: "string", required: true, unique: true },
      subject: { type: "string", required: true },
      body: { type: "string", required: true },
      position: { type: "number", required: true, bigint: true, index: true },
      createdAt: { type: "date", required: true },
    },
  },
} satisfies BetterAuthPlugin["schema"];

interface StoredRow {
  eventId: string;
  subject: string;
  body: string;
  position: number | string;
  createdAt: Date | string;
}

/** The outbox rows through Better Auth's own database adapter. */
function adapterStore(adapter: AuthContext["adapter"]): OutboxStore {
  return {
    async oldest(limit) {
      const rows = await adapter.findMany<StoredRow>({
        model: OUTBOX_MODEL,
        limit,
        sortBy: { field: "position", direction: "asc" },
      });
      return rows.map(
        (r): OutboxRow => ({
          id: r.eventId,
          subject: r.subject,
          body: r.body,
          position: Number(r.position),
          createdAt: new Date(r.createdAt).getTime(),
        }),
      );
    },
    async remove(id) {
      await adapter.deleteMany({ model: OUTBOX_MODEL, where: [{ field: "eventId", value: id }] });
    },
    count: () => adapter.count({ model: OUTBOX_MODEL }),
  };
}

/**
 * The options (SyncOptions of @sync-engine/common), as this plugin reads them: `subjectPrefix`
 * "acme" publishes "acme.user.updated.<id>" (match the engine's `nats.better_auth_subjects`);
 * `secret` is that of the engine's `targets.better_auth`, by default env BETTER_AUTH_WEBHOOK_SECRET;
 * `fields` are user fields (`id` and `email` always go; default every field of the user);
 * `receive` serves POST <basePath>/sync/webhook.
 */
export type SyncEngineOptions = SyncOptions;

/** Set while the receiver writes, so that the hooks do not publish the engine's own writes. */
const receiverWrite = new AsyncLocalStorage<true>();

/** Fields a delivery never writes: the key and this side's bookkeeping. */
const LOCAL_FIELDS = new Set(["id", "createdAt", "updatedAt"]);

export interface SyncEnginePlugin extends BetterAuthPlugin {
  id: "sync-engine";
  /** Publish counters: published, failed (NATS unreachable, no stream, …), lastError. */
  stats: PublisherStats;
  /** The outbox's gauges: rows waiting, the oldest one's age, and this process's counters. */
  outbox(): Promise<OutboxStats>;
  /** Resolves true once the outbox is empty (false after `timeoutMs`). */
  drained(timeoutMs: number): Promise<boolean>;
  /** Stops the outbox relay (waiting rows stay for the next start) and closes NATS. */
  close(): Promise<void>;
}

/**
 * Better Auth plugin for sync-engine: publishes `user.created|updated|deleted` envelopes to NATS
 * JetStream from the user database hooks, and applies the engine's signed deliveries at
 * `POST <basePath>/sync/webhook`.
 */
export function syncEngine(options: SyncEngineOptions = {}): SyncEnginePlugin {
  const { logger, prefix, publishing, receiving, createMissing, publisher, receiver } = setUpSync(options, {
    name: "sync-engine/better-auth",
    secretEnv: "BETTER_AUTH_WEBHOOK_SECRET",
  });
  const fields = options.fields ? [...new Set(["id", "email", ...options.fields])] : undefined;
  let resolveAdapter!: (adapter: AuthContext["adapter"]) => void;
  const adapterReady = new Promise<AuthContext["adapter"]>((resolve) => (resolveAdapter = resolve));
  const relay = new OutboxRelay(
    async () => adapterStore(await adapterReady),
    (subject, id, body) => publisher.send(subject, id, body),
    logger,
  );

  /** Writes the event to the outbox (the app's database, never NATS) and wakes the relay. */
  async function publish(type: EventType, user: Record<string, unknown> | null | undefined): Promise<void> {
    if (!publishing || !user || receiverWrite.getStore()) return;
    const envelope: Envelope = {
      id: newEventId(),
      origin: "better-auth",
      type,
      timestamp: Date.now(),
      data: toWire(user, fields),
    };
    const row = outboxRow(subjectFor(prefix, type, user.id), envelope);
    const adapter = await adapterReady;
    await adapter.create({
      model: OUTBOX_MODEL,
      data: { eventId: row.id, subject: row.subject, body: row.body, position: row.position, createdAt: new Date(row.createdAt) },
    });
    relay.wake();
  }

  type AuthCtx = AuthContext;

  function userFields(context: AuthCtx, data: Record<string, unknown>): Record<string, unknown> {
    const schema = context.tables.user?.fields ?? {};
    const out: Record<string, unknown> = {};
    for (const [name, value] of Object.entries(data)) {
      const attribute = schema[name];
      if (!attribute || LOCAL_FIELDS.has(name) || value === undefined) continue;
      out[name] = attribute.type === "date" && typeof value === "string" ? new Date(value) : value;
    }
    return out;
  }

  async function apply(context: AuthCtx, envelope: Envelope): Promise<string> {
    const id = envelope.data.id;
    if (typeof id !== "string" || id === "") throw new BadDelivery("data.id missing");
    const adapter = context.internalAdapter;
    const existing = await adapter.findUserById(id);
    if (envelope.type === "user.deleted") {
      if (!existing) return "absent";
      await receiverWrite.run(true, () => adapter.deleteUser(id));
      return "deleted";
    }
    const data = userFields(context, envelope.data);
    if (existing) {
      await receiverWrite.run(true, () => adapter.updateUser(id, data));
      return "updated";
    }
    if (!createMissing) return "ignored (user does not exist)";
    if (typeof data.email !== "string") throw new BadDelivery("data.email missing for a new user");
    await receiverWrite.run(true, () =>
      adapter.createUser({ emailVerified: false, name: "", ...data, email: data.email as string, id }, { method: "sync-engine" }),
    );
    return "created";
  }

  const endpoints: BetterAuthPlugin["endpoints"] = {};
  if (receiving) {
    endpoints.syncEngineWebhook = createAuthEndpoint(
      "/sync/webhook",
      { method: "POST", disableBody: true, requireRequest: true, metadata: { isAction: false } },
      async (ctx) => {
        const request = ctx.request as Request;
        const result = await receiver.receive(await request.text(), request.headers, (envelope) =>
          apply(ctx.context, envelope),
        );
        if (result.status === 200) return ctx.json(result.body);
        const status = result.status === 401 ? "UNAUTHORIZED" : result.status === 400 ? "BAD_REQUEST" : "INTERNAL_SERVER_ERROR";
        throw new APIError(status, { message: String(result.body.error ?? "error") });
      },
    );
  }

  return {
    id: "sync-engine",
    endpoints,
    // The engine sends bursts from one address; its own retry policy paces it.
    rateLimit: [{ window: 60, max: 1_000_000, pathMatcher: (path) => path === "/sync/webhook" }],
    schema: outboxSchema,
    init(context) {
      resolveAdapter(context.adapter);
      if (publishing) relay.start();
      return {
        options: {
          databaseHooks: {
            user: {
              create: { after: async (user) => publish("user.created", user as Record<string, unknown>) },
              update: { after: async (user) => publish("user.updated", user as Record<string, unknown>) },
              delete: { after: async (user) => publish("user.deleted", user as Record<string, unknown>) },
            },
          },
        },
      };
    },
    stats: publisher.stats,
    outbox: () => relay.stats(),
    drained: (timeoutMs) => relay.drained(timeoutMs),
    async close() {
      await relay.close();
      await publisher.close();
    },
  };
}
