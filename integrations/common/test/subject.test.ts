import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import { subjectFor, subjectToken } from "@sync-engine/common";

interface Vector {
  id: string;
  token: string;
  partition_of_16: number;
}

/** FNV-1a (32 bits): what nats-server's `{{partition(N,k)}}` hashes the token with. */
function partitionOf(token: string, partitions: number): number {
  let hash = 0x811c9dc5;
  for (const byte of Buffer.from(token, "utf8")) {
    hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  }
  return hash % partitions;
}

describe("subject tokens (PROTOCOL.md §1, Partitions)", () => {
  const vectors: Vector[] = JSON.parse(
    readFileSync(new URL("../../../protocol/vectors/subject_tokens.json", import.meta.url), "utf8"),
  );

  test("every id gets the engine's token and partition (the shared vectors)", () => {
    assert.ok(vectors.length >= 8);
    for (const vector of vectors) {
      assert.equal(subjectToken(vector.id), vector.token, JSON.stringify(vector.id));
      assert.equal(partitionOf(vector.token, 16), vector.partition_of_16);
    }
  });

  test("every subject ends with a token, even for an id NATS cannot carry", () => {
    assert.equal(subjectFor("", "user.updated", "u_1"), "user.updated.u_1");
    assert.equal(subjectFor("acme", "payload.user.created", "a.b"), `acme.payload.user.created.${subjectToken("a.b")}`);
    assert.equal(subjectFor("", "user.deleted", undefined), `user.deleted.${subjectToken("")}`);
  });
});
