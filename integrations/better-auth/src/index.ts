import { AsyncLocalStorage } from "node:async_hooks";
import type { AuthContext, BetterAuthPlugin } from "better-auth";
import { APIError, createAuthEndpoint } from "better-auth/api";
import {
  BadDelivery,
  newEventId,
  setUpSync,
  subjectFor,
  toWire,
  type Envelope,
  type EventType,
  type PublisherStats,
  type SyncOptions,
} from "@sync-engine/common";

export { MemoryDeliveryLog, type DeliveryLog, type Envelope, type Logger, type PublisherStats, type SyncOptions } from "@sync-engine/common";

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
  /** Closes the NATS connection. */
  close(): Promise<void>;
}

/**
 * Better Auth plugin for sync-engine: publishes `user.created|updated|deleted` envelopes to NATS
 * JetStream from the user database hooks, and applies the engine's signed deliveries at
 * `POST <basePath>/sync/webhook`.
 */
export function syncEngine(options: SyncEngineOptions = {}): SyncEnginePlugin {
  const { prefix, publishing, receiving, createMissing, publisher, receiver } = setUpSync(options, {
    name: "sync-engine/better-auth",
    secretEnv: "BETTER_AUTH_WEBHOOK_SECRET",
  });
  const fields = options.fields ? [...new Set(["id", "email", ...options.fields])] : undefined;

  async function publish(type: EventType, user: Record<string, unknown> | null | undefined): Promise<void> {
    if (!publishing || !user || receiverWrite.getStore()) return;
    const envelope: Envelope = {
      id: newEventId(),
      origin: "better-auth",
      type,
      timestamp: Date.now(),
      data: toWire(user, fields),
    };
    await publisher.publish(subjectFor(prefix, type, user.id), envelope);
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
    init() {
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
    close: () => publisher.close(),
  };
}
