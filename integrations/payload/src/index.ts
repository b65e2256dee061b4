import { randomBytes } from "node:crypto";
import type {
  CollectionAfterChangeHook,
  CollectionAfterDeleteHook,
  CollectionConfig,
  Config,
  Endpoint,
  Payload,
  PayloadRequest,
  Plugin,
} from "payload";
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

/** Slug of the outbox collection the plugin adds (hidden in the admin, no API access). */
export const OUTBOX_SLUG = "sync-engine-outbox";

const outboxCollection: CollectionConfig = {
  slug: OUTBOX_SLUG,
  admin: { hidden: true },
  access: { read: () => false, create: () => false, update: () => false, delete: () => false },
  timestamps: true,
  fields: [
    { name: "eventId", type: "text", required: true, unique: true, index: true },
    { name: "subject", type: "text", required: true },
    { name: "body", type: "textarea", required: true },
    { name: "position", type: "number", required: true, index: true },
  ],
};

/** When the hook's transaction commits is not told to plugins: passes this long after a write. */
const WAKE_AFTER_WRITE_MS = [0, 50, 250] as const;

/** The outbox rows through the Local API (outside any request's transaction). */
function localApiStore(payload: Payload): OutboxStore {
  return {
    async oldest(limit) {
      const found = await payload.find({ collection: OUTBOX_SLUG, sort: "position", limit, depth: 0, overrideAccess: true });
      return found.docs.map((doc) => {
        const row = doc as unknown as Record<string, unknown>;
        return {
          id: String(row.eventId),
          subject: String(row.subject),
          body: String(row.body),
          position: Number(row.position),
          createdAt: new Date(String(row.createdAt)).getTime(),
        };
      });
    },
    async remove(id) {
      await payload.delete({ collection: OUTBOX_SLUG, where: { eventId: { equals: id } }, overrideAccess: true });
    },
    count: async () => (await payload.count({ collection: OUTBOX_SLUG, overrideAccess: true })).totalDocs,
  };
}

/** `req.context` key set on the receiver's own writes; the plugin's hooks skip them. */
export const SYNC_CONTEXT_KEY = "syncEngineDelivery";

/**
 * The options: SyncOptions of @sync-engine/common and the ones below. This plugin publishes
 * "<subjectPrefix>.payload.user.updated.<id>" (match the engine's `nats.payload_subjects`), takes
 * the secret of the engine's `targets.payload` (default: env PAYLOAD_WEBHOOK_SECRET), and by default
 * publishes every field of the document except Payload's own `id` and auth internals (`fields`
 * narrows that; the id field always goes).
 */
export interface PayloadSyncOptions extends SyncOptions {
  /** Slug of the users collection. Default "users". */
  collection?: string;
  /** The field holding the Better Auth user id. Default "betterAuthUserId". */
  idField?: string;
  /** Path of the receiver endpoint under the API route. Default "/sync/webhook" (POST /api/sync/webhook). */
  endpointPath?: string;
}

/** Auth-collection internals that never leave Payload. */
const INTERNAL_FIELDS = new Set([
  "id",
  "hash",
  "salt",
  "password",
  "sessions",
  "resetPasswordToken",
  "resetPasswordExpiration",
  "loginAttempts",
  "lockUntil",
  "_verified",
  "_verificationToken",
  "apiKey",
  "apiKeyIndex",
  "enableAPIKey",
  "collection",
  "_strategy",
]);
/** Fields a delivery never writes: this side's bookkeeping. */
const LOCAL_FIELDS = new Set(["createdAt", "updatedAt"]);

export interface SyncEnginePayloadPlugin extends Plugin {
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
 * Payload plugin for sync-engine: publishes `payload.user.created|updated|deleted.<betterAuthUserId>`
 * envelopes from the users collection's hooks, and applies the engine's signed deliveries at
 * `POST /api/sync/webhook` through the Local API.
 */
export function syncEnginePlugin(options: PayloadSyncOptions = {}): SyncEnginePayloadPlugin {
  const slug = options.collection ?? "users";
  const idField = options.idField ?? "betterAuthUserId";
  const { logger, prefix, publishing, receiving, createMissing, publisher, receiver } = setUpSync(options, {
    name: "sync-engine/payload",
    secretEnv: "PAYLOAD_WEBHOOK_SECRET",
  });
  let resolvePayload!: (payload: Payload) => void;
  const payloadReady = new Promise<Payload>((resolve) => (resolvePayload = resolve));
  const relay = new OutboxRelay(
    async () => localApiStore(await payloadReady),
    (subject, id, body) => publisher.send(subject, id, body),
    logger,
  );

  function publishedData(doc: Record<string, unknown>): Record<string, unknown> {
    const picked = options.fields
      ? toWire(doc, [...new Set([idField, ...options.fields])])
      : toWire(Object.fromEntries(Object.entries(doc).filter(([name]) => !INTERNAL_FIELDS.has(name))));
    return picked;
  }

  /**
   * Writes the event to the outbox through `req`, so it shares the write's transaction (a
   * rollback takes it back), and wakes the relay, which publishes it once committed.
   */
  async function publish(type: EventType, doc: Record<string, unknown>, req: PayloadRequest): Promise<void> {
    if (!publishing || req.context?.[SYNC_CONTEXT_KEY]) return;
    const key = doc[idField];
    if (typeof key !== "string" || key === "") return; // not linked to Better Auth
    const verb = type.slice("user.".length);
    const envelope: Envelope = {
      id: newEventId(),
      origin: "payload",
      type,
      timestamp: Date.now(),
      data: publishedData(doc),
    };
    const row = outboxRow(subjectFor(prefix, `payload.user.${verb}`, key), envelope);
    await req.payload.create({
      collection: OUTBOX_SLUG,
      data: { eventId: row.id, subject: row.subject, body: row.body, position: row.position },
      req,
      overrideAccess: true,
      depth: 0,
    });
    for (const delay of WAKE_AFTER_WRITE_MS) setTimeout(() => relay.wake(), delay).unref?.();
  }

  const afterChange: CollectionAfterChangeHook = async ({ doc, operation, req }) => {
    await publish(operation === "create" ? "user.created" : "user.updated", doc, req);
    return doc;
  };
  const afterDelete: CollectionAfterDeleteHook = async ({ doc, req }) => {
    await publish("user.deleted", doc, req);
  };

  function writableFields(payload: Payload, data: Record<string, unknown>): Record<string, unknown> {
    const names = new Set(payload.collections[slug].config.flattenedFields.map((field) => field.name));
    const out: Record<string, unknown> = {};
    for (const [name, value] of Object.entries(data)) {
      if (names.has(name) && !INTERNAL_FIELDS.has(name) && !LOCAL_FIELDS.has(name) && value !== undefined) {
        out[name] = value;
      }
    }
    return out;
  }

  async function apply(payload: Payload, envelope: Envelope): Promise<string> {
    const key = envelope.data[idField];
    if (typeof key !== "string" || key === "") throw new BadDelivery(`data.${idField} missing`);
    const context = { [SYNC_CONTEXT_KEY]: true };
    const found = await payload.find({
      collection: slug,
      where: { [idField]: { equals: key } },
      limit: 1,
      depth: 0,
      overrideAccess: true,
      pagination: false,
    });
    const existing = found.docs[0] as { id: string | number } | undefined;
    if (envelope.type === "user.deleted") {
      if (!existing) return "absent";
      await payload.delete({ collection: slug, id: existing.id, overrideAccess: true, context });
      return "deleted";
    }
    const data = writableFields(payload, envelope.data);
    if (existing) {
      await payload.update({ collection: slug, id: existing.id, data, overrideAccess: true, depth: 0, context });
      return "updated";
    }
    if (!createMissing) return "ignored (user does not exist)";
    const auth = payload.collections[slug].config.auth;
    // Users of an auth collection with a local strategy need a password: a random one, as they
    // sign in through Better Auth.
    const password = auth && !auth.disableLocalStrategy ? randomBytes(24).toString("base64url") : undefined;
    await payload.create({
      collection: slug,
      data: { ...data, [idField]: key, ...(password ? { password } : {}) },
      overrideAccess: true,
      depth: 0,
      context,
    });
    return "created";
  }

  const endpoint: Endpoint = {
    path: options.endpointPath ?? "/sync/webhook",
    method: "post",
    handler: async (req) => {
      const rawBody = req.text ? await req.text() : "";
      const result = await receiver.receive(rawBody, req.headers, (envelope) => apply(req.payload, envelope));
      return Response.json(result.body, { status: result.status });
    },
  };

  const plugin = ((config: Config): Config => {
    const collections = config.collections ?? [];
    const target = collections.find((collection) => collection.slug === slug);
    if (!target) {
      throw new Error(`[sync-engine] the Payload config has no collection "${slug}" (option \`collection\`)`);
    }
    if (!target.fields.some((field) => "name" in field && field.name === idField)) {
      throw new Error(`[sync-engine] collection "${slug}" has no field "${idField}" (option \`idField\`)`);
    }
    const withHooks: CollectionConfig = {
      ...target,
      hooks: {
        ...target.hooks,
        afterChange: [...(target.hooks?.afterChange ?? []), afterChange],
        afterDelete: [...(target.hooks?.afterDelete ?? []), afterDelete],
      },
    };
    const onInit = config.onInit;
    return {
      ...config,
      collections: [...collections.map((collection) => (collection === target ? withHooks : collection)), outboxCollection],
      endpoints: receiving ? [...(config.endpoints ?? []), endpoint] : config.endpoints,
      async onInit(payload) {
        await onInit?.(payload);
        resolvePayload(payload);
        if (publishing) relay.start();
      },
    };
  }) as SyncEnginePayloadPlugin;
  plugin.stats = publisher.stats;
  plugin.outbox = () => relay.stats();
  plugin.drained = (timeoutMs) => relay.drained(timeoutMs);
  plugin.close = async () => {
    await relay.close();
    await publisher.close();
  };
  return plugin;
}
