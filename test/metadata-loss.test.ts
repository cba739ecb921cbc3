import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { fillRandom, sha256OfExport } from './helpers/export-data.ts';
import { duBytes } from './helpers/run.ts';

interface Events {
  events: Array<{ type: string; message: string }>;
}

/**
 * The metadata store (meta/) lost or damaged: the daemon deletes no replica
 * it cannot account for, says clearly what is wrong, and the data comes back
 * with the metadata.
 */
describe('metadata lost or damaged', () => {
  let d: DaemonProcess;
  let sha: string;
  const meta = () => path.join(d.dataDir, 'meta');
  const replicas = () => path.join(d.dataDir, 'replicas');

  before(async () => {
    d = await DaemonProcess.start();
    await d.createVolume('v', '64M');
    await fillRandom(d.uri('v'), '16M');
    sha = await sha256OfExport(d.uri('v'));
    await d.stop();
  });
  after(() => d.cleanup());

  it('a missing meta/ deletes no replica, and the volume is back with its metadata', async () => {
    const before = await duBytes(replicas());
    assert.ok(before > 16 * 1024 * 1024, 'the replica holds the data');
    await fs.promises.rename(meta(), `${meta()}.away`);
    d = await d.restart();
    const events = (await d.api_<Events>('GET', '/v1/events')).json.events;
    assert.ok(
      events.some((e) => e.type === 'sweep-refused' && /meta/.test(e.message)),
      JSON.stringify(events),
    );
    assert.equal(await duBytes(replicas()), before, 'every replica folder is still there');
    await d.stop();
    await fs.promises.rm(meta(), { recursive: true, force: true });
    await fs.promises.rename(`${meta()}.away`, meta());
    d = await d.restart();
    assert.equal(await sha256OfExport(d.uri('v')), sha);
    await d.stop();
  });

  it('a damaged MANIFEST is named as such, and --repair-metadata brings the volume back', async () => {
    const manifest = (await fs.promises.readdir(meta())).find((f) => f.startsWith('MANIFEST-'));
    assert.ok(manifest);
    await fs.promises.writeFile(path.join(meta(), manifest), Buffer.alloc(200, 0x5a));
    await assert.rejects(d.restart(), (err: Error) => {
      assert.match(err.message, /metadata store .* is damaged/);
      assert.match(err.message, /--repair-metadata/);
      assert.doesNotMatch(err.message, /another corral daemon/);
      return true;
    });
    d = await DaemonProcess.start({ dataDir: d.dataDir, args: ['--repair-metadata'] });
    assert.match(d.stderr, /repaired; the damaged one was copied to/);
    assert.equal(await sha256OfExport(d.uri('v')), sha);
    const copies = (await fs.promises.readdir(d.dataDir)).filter((f) =>
      f.startsWith('meta.before-repair-'),
    );
    assert.equal(copies.length, 1, 'the damaged store is kept');
    await d.stop();
  });

  it('a replica folder nobody owns is quarantined, not deleted; one older than the metadata stays', async () => {
    const stray = path.join(replicas(), '0b5e55ed-0000-4000-8000-000000000001');
    await fs.promises.mkdir(stray);
    await fs.promises.writeFile(path.join(stray, 'x.layer'), Buffer.alloc(8192, 7));
    const old = path.join(replicas(), '0b5e55ed-0000-4000-8000-000000000002');
    await fs.promises.mkdir(old);
    const past = new Date('2001-01-01T00:00:00Z');
    await fs.promises.utimes(old, past, past);
    d = await d.restart();
    const moved = path.join(d.dataDir, 'quarantine', path.basename(stray), 'x.layer');
    assert.deepEqual(await fs.promises.readFile(moved), Buffer.alloc(8192, 7));
    assert.ok(!fs.existsSync(stray));
    assert.ok(fs.existsSync(old), 'a folder older than the metadata is left alone');
    const events = (await d.api_<Events>('GET', '/v1/events')).json.events;
    assert.ok(
      events.some(
        (e) => e.type === 'replica-quarantined' && e.message.includes(moved.slice(0, -8)),
      ),
    );
    assert.ok(
      events.some((e) => e.type === 'sweep-refused' && e.message.includes(path.basename(old))),
    );
    assert.equal(await sha256OfExport(d.uri('v')), sha);
  });
});
