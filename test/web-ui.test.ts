import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { DaemonProcess, ROOT } from './helpers/daemon.ts';
import { mustRun, waitFor } from './helpers/run.ts';

/** Screenshots of what the tests saw, kept after the run (not in git). */
const ARTIFACTS = path.join(ROOT, 'test-artifacts');

/** Debian's chromium, driven by playwright-core: no browser download. */
const CHROMIUM = process.env.CORRAL_CHROMIUM ?? '/usr/bin/chromium';

interface Snapshot {
  name: string;
}

describe('the web UI in Chromium', () => {
  let d: DaemonProcess;
  let browser: Browser;
  let readOnly: string;
  before(async () => {
    d = await DaemonProcess.start();
    await d.createVolume('db1', '64M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('db1'), '-c', 'write -P 0x42 0 1M']);
    const made = await d.cli(['token', 'create', '--name', 'viewer', '--role', 'read-only']);
    assert.equal(made.code, 0, made.stderr);
    readOnly = made.stdout.trim();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  });
  after(async () => {
    await browser?.close();
    await d?.cleanup();
  });

  async function shot(page: Page, name: string): Promise<void> {
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, `ui-${name}.png`), fullPage: true });
  }

  async function login(
    token: string,
    viewport: { width: number; height: number } = { width: 1280, height: 800 },
  ): Promise<Page> {
    const page = await browser.newPage({ viewport });
    await page.goto(`${d.api}/`);
    // Not logged in: the login page, whatever was asked for.
    assert.match(page.url(), /\/ui\/login$/);
    await page.fill('input[name=token]', token);
    await page.click('button');
    await page.waitForURL(/\/ui\/$/);
    return page;
  }

  it('refuses a wrong token and shows the dashboard to a right one', async () => {
    const page = await browser.newPage();
    await page.goto(`${d.api}/ui/login`);
    await page.fill('input[name=token]', 'corral_nobody_' + '0'.repeat(64));
    await page.click('button');
    assert.match((await page.textContent('.error')) ?? '', /not valid/);
    await page.close();

    const admin = await login(d.token);
    assert.match((await admin.textContent('#nodes-up')) ?? '', /1\/1/);
    assert.match((await admin.textContent('#volume-count')) ?? '', /1\s*volumes/);
    assert.match((await admin.textContent('header')) ?? '', /host-admin \(admin\)/);
    await shot(admin, 'dashboard');
    await admin.close();
  });

  it('lists volumes, creates one through the form, takes a snapshot, shows live stats', async () => {
    const page = await login(d.token);
    await page.goto(`${d.api}/ui/volumes`);
    assert.ok(await page.isVisible('tr[data-volume=db1]'));
    await page.fill('input[name=name]', 'web1');
    await page.fill('input[name=size]', '32M');
    await page.click('form[hx-post="/ui/volumes"] button');
    await page.waitForSelector('tr[data-volume=web1]');
    const created = await d.api_<{ sizeBytes: number }>('GET', '/v1/volumes/web1');
    assert.equal(created.status, 200);
    assert.equal(created.json.sizeBytes, 32 * 1024 * 1024);

    await page.click('a[href="/ui/volumes/db1"]');
    await page.waitForSelector('#replicas');
    assert.match((await page.textContent('#replicas')) ?? '', /local\s*RW/);
    await page.fill('#snapshots input[name=name]', 'from-the-ui');
    await page.click('#snapshots > form button');
    await page.waitForSelector('tr[data-snapshot=from-the-ui]');
    const snaps = await d.api_<{ snapshots: Snapshot[] }>('GET', '/v1/volumes/db1/snapshots');
    assert.deepEqual(
      snaps.json.snapshots.map((s) => s.name),
      ['from-the-ui'],
    );
    // The stats refresh themselves (htmx, every 2 s): I/O done now shows up without a reload.
    const before = Number(
      (await page.textContent('#stats tr:nth-child(2) td:nth-child(2)'))?.trim(),
    );
    await mustRun('qemu-io', ['-f', 'raw', d.uri('db1'), '-c', 'write -P 0x43 0 64k']);
    // A string, evaluated in the page (the test's own types know no DOM).
    await page.waitForFunction(
      `Number(document.querySelector('#stats tr:nth-child(2) td:nth-child(2)')?.textContent) > ${before}`,
      undefined,
      { timeout: 10_000 },
    );
    // ... and the chart's rate with it: the sample that saw the writes shows writes per second.
    assert.match((await page.textContent('#iops')) ?? '', /([1-9][\d.]*|0\.[1-9]) writes\/s/);
    await page.close();
  });

  it('reverts a snapshot, backs up with progress, restores, and deletes only after a confirmation', async () => {
    const page = await login(d.token);
    await page.goto(`${d.api}/ui/volumes/db1`);
    // What the snapshot holds (0x42: the 0x43 write came after it) is overwritten, then brought back.
    await mustRun('qemu-io', ['-f', 'raw', d.uri('db1'), '-c', 'write -P 0x44 0 1M']);
    page.once('dialog', (dialog) => void dialog.accept());
    await page.click('tr[data-snapshot=from-the-ui] button[data-action=revert]');
    await page.waitForSelector('#snapshots .notice');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('db1'), '-c', 'read -P 0x42 0 1M']);

    await page.click('#backups button:text("Back up now")');
    await page.waitForSelector('#backups .operation');
    await page.waitForSelector('#backups tr[data-backup]', { timeout: 30_000 });
    const backups = await d.api_<{ backups: Array<{ volume: string; url: string }> }>(
      'GET',
      '/v1/backups?volume=db1',
    );
    assert.equal(backups.json.backups.length, 1);
    await shot(page, 'volume');
    await page.fill('#backups input[name=into]', 'db1-restored');
    await page.click('#backups form button');
    await page.waitForSelector('#backups .operation');
    // The restore runs on: its volume is served once it is done.
    await waitFor('the restored volume', async () =>
      (await d.api_<{ state: string }>('GET', '/v1/volumes/db1-restored')).json.state === 'attached'
        ? true
        : undefined,
    );
    await mustRun('qemu-io', ['-f', 'raw', d.uri('db1-restored'), '-c', 'read -P 0x42 0 1M']);

    // A standby of db1: its page says what it follows, the backup it holds, how to activate it.
    const standby = await d.api_('POST', '/v1/volumes?wait=true', {
      name: 'db1-dr',
      standbyFrom: 'db1',
      pollSeconds: 60,
    });
    assert.equal(standby.status, 200, JSON.stringify(standby.json));
    await page.goto(`${d.api}/ui/volumes/db1-dr`);
    const line = (await page.textContent('#standby')) ?? '';
    assert.match(line, /follows \S+volume=db1 every 60 s; holds backup-\S+/);
    assert.match(line, /corral volume activate db1-dr/);
    assert.equal((await d.api_('DELETE', '/v1/volumes/db1-dr')).status, 204);
    await page.goto(`${d.api}/ui/volumes/db1`);

    // A recurring job, added and removed from the page.
    await page.selectOption('#jobs select[name=task]', 'snapshot');
    await page.fill('#jobs input[name=cron]', '0 3 * * *');
    await page.fill('#jobs input[name=retain]', '7');
    await page.click('#jobs form button');
    await page.waitForSelector('#jobs tr[data-job]');
    const jobs = await d.api_<{ jobs: Array<{ id: string; cron: string; retain: number }> }>(
      'GET',
      '/v1/jobs',
    );
    assert.deepEqual(
      jobs.json.jobs.map((j) => `${j.cron}/${j.retain}`),
      ['0 3 * * */7'],
    );
    page.once('dialog', (dialog) => void dialog.accept());
    await page.click('#jobs button[data-action=delete]');
    await page.waitForSelector('#jobs tr[data-job]', { state: 'detached' });
    assert.deepEqual((await d.api_<{ jobs: unknown[] }>('GET', '/v1/jobs')).json.jobs, []);
    // Removing the job removed the job, not the volume (a route pattern once matched both).
    assert.equal((await d.api_('GET', '/v1/volumes/db1')).status, 200);

    // Delete asks first: dismissed, nothing happens; accepted, the volume goes.
    await page.goto(`${d.api}/ui/volumes`);
    page.once('dialog', (dialog) => void dialog.dismiss());
    await page.click('tr[data-volume=web1] button[data-action=delete]');
    assert.equal((await d.api_('GET', '/v1/volumes/web1')).status, 200);
    page.once('dialog', (dialog) => void dialog.accept());
    await page.click('tr[data-volume=web1] button[data-action=delete]');
    await page.waitForSelector('tr[data-volume=web1]', { state: 'detached' });
    assert.equal((await d.api_('GET', '/v1/volumes/web1')).status, 404);
    await page.close();
  });

  it('works on a phone-sized screen', async () => {
    const page = await login(d.token, { width: 390, height: 844 });
    for (const at of ['/ui/', '/ui/volumes', '/ui/volumes/db1', '/ui/nodes', '/ui/backups']) {
      await page.goto(`${d.api}${at}`);
      const overflow = await page.evaluate<number>(
        'document.documentElement.scrollWidth - window.innerWidth',
      );
      assert.ok(overflow <= 0, `${at} is ${overflow} px wider than the screen`);
    }
    await page.goto(`${d.api}/ui/volumes/db1`);
    await page.fill('#snapshots input[name=name]', 'from-a-phone');
    await page.click('#snapshots > form button');
    await page.waitForSelector('tr[data-snapshot=from-a-phone]');
    await shot(page, 'phone-volume');
    await page.close();
  });

  it('a read-only token sees everything and changes nothing', async () => {
    const page = await login(readOnly);
    await page.goto(`${d.api}/ui/volumes/db1`);
    await page.fill('#snapshots input[name=name]', 'not-allowed');
    await page.click('#snapshots > form button');
    await page.waitForSelector('#snapshots .error');
    assert.match((await page.textContent('#snapshots .error')) ?? '', /needs the operator role/);
    const snaps = await d.api_<{ snapshots: Snapshot[] }>('GET', '/v1/volumes/db1/snapshots');
    assert.ok(!snaps.json.snapshots.some((s) => s.name === 'not-allowed'));
    // The refusal is an event, shown on the events page.
    await page.goto(`${d.api}/ui/events`);
    assert.match((await page.textContent('#events')) ?? '', /read-only token "viewer"/);
    await page.close();
  });

  it('a form posted from another site is refused', async () => {
    const r = await fetch(`${d.api}/ui/volumes`, {
      method: 'POST',
      headers: {
        origin: 'http://evil.example',
        cookie: `corral_token=${d.token}`,
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: 'name=evil&size=1M',
    });
    assert.equal(r.status, 403);
    assert.equal((await d.api_('GET', '/v1/volumes/evil')).status, 404);
  });
});
