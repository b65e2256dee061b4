// A headless Payload app (SQLite, schema push) with the sync-engine plugin, for tests.
import { sqliteAdapter } from "@payloadcms/db-sqlite";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { buildConfig, getPayload, handleEndpoints } from "payload";
import { syncEnginePlugin, type PayloadSyncOptions } from "@sync-engine/payload";
import { serve, tempDir } from "./support.ts";

export async function payloadApp(options: PayloadSyncOptions, { authUsers = false } = {}) {
  const dir = tempDir("payload");
  const plugin = syncEnginePlugin(options);
  const key = `test-${randomUUID()}`;
  const config = await buildConfig({
    secret: "payload-test-secret-0123456789",
    db: sqliteAdapter({ client: { url: `file:${join(dir.path, "payload.db")}` }, push: true }),
    telemetry: false,
    typescript: { autoGenerate: false },
    admin: { user: "admins" },
    logger: { options: { level: "warn" } },
    collections: [
      { slug: "admins", auth: true, fields: [] },
      {
        slug: "users",
        auth: authUsers,
        fields: [
          ...(authUsers ? [] : [{ name: "email", type: "email" as const, required: true }]),
          { name: "fullName", type: "text" },
          { name: "betterAuthUserId", type: "text", unique: true, index: true },
          { name: "bio", type: "text" },
        ],
      },
    ],
    plugins: [plugin],
  });
  const payload = await getPayload({ config, key });
  let server: Awaited<ReturnType<typeof serve>> | undefined;
  return {
    payload,
    plugin,
    config,
    async findByAuthId(id: string) {
      const found = await payload.find({ collection: "users", where: { betterAuthUserId: { equals: id } }, limit: 1, depth: 0 });
      return (found.docs[0] as Record<string, any> | undefined) ?? null;
    },
    async listUsers() {
      const found = await payload.find({ collection: "users", limit: 0, pagination: false, depth: 0, sort: "betterAuthUserId" });
      return found.docs as Record<string, any>[];
    },
    /** Serves Payload's REST API (handleEndpoints, its framework-agnostic adapter) on 127.0.0.1. */
    async listen(): Promise<string> {
      server = await serve((request) => handleEndpoints({ config, request, payloadInstanceCacheKey: key }));
      return server.url;
    },
    async close() {
      await server?.close();
      await plugin.close();
      await payload.destroy();
      dir.remove();
    },
  };
}
