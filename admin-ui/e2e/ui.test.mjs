// End-to-end test of the staff UI: starts `vrs-node demo` (the README's run command), then
// drives the pages in headless Chromium as a clerk, a venue's reception and an auditor would.
// Run by scripts/ui-test.sh; VRS_NODE names the binary, CHROMIUM the browser.

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const binary = process.env.VRS_NODE || join(root, 'target/debug/vrs-node');
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = join(root, 'target/ui-screens');
const password = 'demo-password-2021';
const vial = '(01)04987000001014(17)301231(10)FA5765';
const japanese = /[\u3040-\u30ff\u4e00-\u9fff]/;

function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

/** Starts the demo and resolves once it serves, with what it printed. */
function startDemo(data, port) {
  const child = spawn(binary, ['demo', '--data', data, '--listen', `127.0.0.1:${port}`, '--residents', '300'], {
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, VRS_LOG: 'warn' },
  });
  let out = '';
  let err = '';
  child.stderr.on('data', (chunk) => { err += chunk; });
  const ready = new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`the demo did not start in 300 s:\n${out}\n${err}`)), 300_000);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('停止は Ctrl-C')) {
        clearTimeout(timer);
        ok(out);
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      fail(new Error(`the demo stopped (${code}):\n${out}\n${err}`));
    });
  });
  return { child, ready };
}

async function main() {
  const work = mkdtempSync(join(tmpdir(), 'vrs-ui-'));
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const demo = startDemo(join(work, 'node'), port);
  let browser;
  let page;
  try {
    const printed = await demo.ready;
    // The demo's own "try it" coupon: issued and not yet used.
    const spare = printed.match(/"coupon":"(\d+)"/);
    assert.ok(spare, 'the demo prints a coupon to try');
    const coupon = spare[1];
    // A municipal administrator for the relocation pages, added with the demo's admin token.
    const admin = printed.match(/トークン \/ token: (vrs_t_[0-9a-f]+)/);
    assert.ok(admin, 'the demo prints its admin token');
    const added = await fetch(`${base}/api/v1/users`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${admin[1]}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ username: 'kanri', role: 'municipal_admin', password }),
    });
    assert.equal(added.status, 201, await added.text());

    browser = await chromium.launch({
      executablePath: browserPath,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync'],
    });
    const context = await browser.newContext({ locale: 'ja-JP', timezoneId: 'Asia/Tokyo' });
    page = await context.newPage();
    const problems = [];
    page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
    page.on('console', (message) => {
      // A refused request (4xx) is logged by the browser too; anything else is a fault.
      if (message.type() === 'error' && !/status of 4\d\d/.test(message.text())) problems.push(message.text());
    });
    mkdirSync(shots, { recursive: true });
    const message = page.locator('#message');

    // 1. The node's address opens the UI, in Japanese, at the login form.
    await page.goto(`${base}/`);
    assert.equal(new URL(page.url()).pathname, '/ui/');
    assert.equal(await page.getAttribute('html', 'lang'), 'ja');
    await page.locator('#view-login h2', { hasText: 'ログイン' }).waitFor();
    assert.ok(await page.locator('#nav').isHidden(), 'no menu before login');

    // 2. A wrong password is refused with a Japanese message.
    await page.fill('#login-username', 'tanaka');
    await page.fill('#login-password', 'not-the-password');
    await page.click('#login-form button[type=submit]');
    await message.waitFor({ state: 'visible' });
    assert.match(await message.textContent(), japanese);
    assert.ok(await page.locator('#view-login').isVisible(), 'still at the login form');

    // 3. The clerk logs in and sees their municipality and role.
    await page.fill('#login-password', password);
    await page.click('#login-form button[type=submit]');
    await page.locator('#view-search').waitFor({ state: 'visible' });
    const who = await page.textContent('#who');
    assert.match(who, /横浜市/);
    assert.match(who, /tanaka/);
    assert.ok(!(await page.locator('#nav a[href="#/audit"]').isVisible()), 'a clerk has no audit page');

    // 4. Find the resident the demo vaccinated, open their record.
    await page.fill('#search-atena', '0001000000');
    await page.click('#search-form button[type=submit]');
    await page.locator('#search-results tbody tr').first().click();
    await page.locator('#view-resident').waitFor({ state: 'visible' });
    const dose = page.locator('#resident-history tbody tr').first();
    assert.equal(await dose.locator('td').nth(5).textContent(), '有効');
    await page.screenshot({ path: join(shots, 'resident.png'), fullPage: true });

    // 5. Void the dose: the reason is required, then the row shows it voided and the
    // correction lists the reason.
    // Escape closes the dialog and does nothing (and leaves nothing behind for the next).
    await dose.locator('button[data-action=void]').click();
    await page.locator('#reason-dialog').waitFor({ state: 'visible' });
    await page.keyboard.press('Escape');
    await page.locator('#reason-dialog').waitFor({ state: 'hidden' });
    assert.equal(await dose.locator('td').nth(5).textContent(), '有効');
    await dose.locator('button[data-action=void]').click();
    await page.locator('#reason-dialog').waitFor({ state: 'visible' });
    assert.ok(!(await page.locator('#amend-fields').isVisible()), 'a void asks for a reason only');
    await page.click('#reason-ok');
    assert.ok(await page.locator('#reason-dialog').isVisible(), 'no void without a reason');
    await page.fill('#reason-text', '画面からの取消試験：別人の接種券');
    await page.click('#reason-ok');
    await page.locator('#message.ok').waitFor();
    assert.equal(await page.locator('#resident-history tbody tr').first().locator('td').nth(5).textContent(), '取消済');
    await page.locator('#resident-corrections td', { hasText: '画面からの取消試験' }).waitFor();
    // The demo's amendment and this void, nothing more.
    assert.equal(await page.locator('#resident-corrections tbody tr').count(), 2);
    await page.screenshot({ path: join(shots, 'resident-voided.png'), fullPage: true });

    // 6. Reissue a coupon of another resident: the old one is superseded, a new one valid.
    await page.goto(`${base}/ui/#/search`);
    await page.fill('#search-atena', '0001000001');
    await page.click('#search-form button[type=submit]');
    await page.locator('#search-results tbody tr').first().click();
    await page.locator('#resident-coupons button[data-action=reissue]').waitFor();
    page.once('dialog', (dialog) => dialog.accept());
    await page.click('#resident-coupons button[data-action=reissue]');
    await page.locator('#message.ok', { hasText: '再発行しました' }).waitFor();
    assert.match(await message.textContent(), /新しい接種券：\d{18}（発行世代 1）/);
    const states = await page.locator('#resident-coupons tbody tr td:nth-child(4)').allTextContents();
    assert.deepEqual(states.sort(), ['再発行により無効', '有効'].sort());

    // 7. Reception: scan the coupon (the scanner ends with Enter), then the vial.
    await page.click('#nav a[href="#/capture"]');
    await page.fill('#capture-venue', 'yokohama-arena');
    await page.fill('#capture-coupon', coupon);
    await page.press('#capture-coupon', 'Enter');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'capture-vial');
    await page.fill('#capture-vial', vial);
    await page.press('#capture-vial', 'Enter');
    await page.locator('#capture-result', { hasText: '記録しました' }).waitFor();
    assert.match(await page.textContent('#capture-result'), /1回目/);
    await page.screenshot({ path: join(shots, 'capture.png'), fullPage: true });

    // 8. A coupon that is not this municipality's signature is refused, in Japanese, then
    // in English once the language is switched.
    const forged = coupon.slice(0, -1) + (coupon.endsWith('0') ? '1' : '0');
    await page.fill('#capture-coupon', forged);
    await page.fill('#capture-vial', vial);
    await page.click('#capture-form button[type=submit]');
    await message.waitFor({ state: 'visible' });
    assert.match(await message.textContent(), japanese);
    await page.click('#lang');
    await page.locator('#nav a[href="#/capture"]', { hasText: 'Record a dose' }).waitFor();
    assert.equal(await page.getAttribute('html', 'lang'), 'en');
    await page.fill('#capture-coupon', forged);
    await page.fill('#capture-vial', vial);
    await page.click('#capture-form button[type=submit]');
    await message.waitFor({ state: 'visible' });
    assert.doesNotMatch(await message.textContent(), japanese);
    await page.click('#lang');

    // 9. The session survives a reload (the CSRF token comes back with /auth/me), then
    // logging out returns to the login form.
    await page.reload();
    await page.locator('#view-capture').waitFor({ state: 'visible' });
    await page.click('#logout');
    await page.locator('#view-login').waitFor({ state: 'visible' });

    // 10. The administrator moves a resident out to Chiyoda (131016): the record becomes
    // read-only here and the handoff is listed beside the demo's own.
    await page.fill('#login-username', 'kanri');
    await page.fill('#login-password', password);
    await page.click('#login-form button[type=submit]');
    await page.locator('#view-search').waitFor({ state: 'visible' });
    await page.click('#nav a[href="#/handoffs"]');
    await page.locator('#handoffs-outgoing tbody tr', { hasText: '131016' }).first().waitFor();
    const before = await page.locator('#handoffs-outgoing tbody tr').count();
    await page.fill('#ask-my-number', '123');
    await page.fill('#ask-birth', '1990-04-01');
    await page.fill('#ask-atena', '0009990001');
    await page.fill('#ask-address', '神奈川県横浜市中区1-1');
    await page.click('#ask-form button[type=submit]');
    await message.waitFor({ state: 'visible' });
    assert.match(await message.textContent(), /my_number/);
    assert.match(await message.textContent(), japanese);
    await page.goto(`${base}/ui/#/search`);
    await page.fill('#search-atena', '0001000010');
    await page.click('#search-form button[type=submit]');
    await page.locator('#search-results tbody tr').first().click();
    await page.click('#resident-move-out');
    assert.ok(await page.locator('#move-fields').isVisible());
    await page.fill('#move-to', '131016');
    await page.fill('#reason-text', '転居（画面からの試験）');
    await page.click('#reason-ok');
    await page.locator('#message.ok', { hasText: '引き継ぎを送りました' }).waitFor();
    assert.match(await page.textContent('#resident-identity'), /転出済み.*131016/);
    assert.equal(await page.locator('#resident-history button, #resident-coupons button').count(), 0, 'read-only');
    assert.ok(await page.locator('#resident-move-out').isHidden());
    await page.click('#nav a[href="#/handoffs"]');
    await page.locator('#handoffs-outgoing td', { hasText: '転居（画面からの試験）' }).waitFor();
    assert.equal(await page.locator('#handoffs-outgoing tbody tr').count(), before + 1);
    await page.screenshot({ path: join(shots, 'handoffs.png'), fullPage: true });
    await page.click('#logout');
    await page.locator('#view-login').waitFor({ state: 'visible' });

    // 11. The auditor sees the clerk's void in the audit log, and the chain intact.
    await page.fill('#login-username', 'kansa');
    await page.fill('#login-password', password);
    await page.click('#login-form button[type=submit]');
    await page.click('#nav a[href="#/audit"]');
    await page.locator('#audit-table tr', { hasText: 'dose.void' }).filter({ hasText: 'user:tanaka' }).first().waitFor();
    await page.click('#audit-verify');
    await page.locator('#audit-verdict', { hasText: '改ざんなし' }).waitFor();
    assert.ok(!(await page.locator('#nav a[href="#/search"]').isVisible()), 'an auditor does not look residents up');
    await page.screenshot({ path: join(shots, 'audit.png'), fullPage: true });

    assert.deepEqual(problems, [], 'the browser reported no script error or policy violation');
    console.log('ui: 11 steps passed (login, search, void, reissue, capture, refusals ja/en, reload, relocation, audit)');
  } catch (error) {
    if (page) {
      await page.screenshot({ path: join(shots, 'failure.png'), fullPage: true }).catch(() => {});
      const shown = await page.locator('#message').textContent().catch(() => '');
      console.error(`the page showed: ${shown} (screenshot target/ui-screens/failure.png)`);
    }
    throw error;
  } finally {
    if (browser) await browser.close();
    try {
      process.kill(-demo.child.pid, 'SIGTERM');
    } catch {
      // already gone
    }
    await new Promise((ok) => setTimeout(ok, 500));
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
