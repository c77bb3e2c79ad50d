// End-to-end test of the staff UI: starts `vrs-node demo` (the README's run command), then
// drives the pages in headless Chromium as a clerk, a venue's reception and an auditor would.
// Run by scripts/ui-test.sh; VRS_NODE names the binary, CHROMIUM the browser.

import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
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

/** Logs `username` in at the page's login form (the page is at the form). */
async function logIn(page, username, secret) {
  await page.fill('#login-username', username);
  await page.fill('#login-password', secret);
  await page.click('#login-form button[type=submit]');
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
    await logIn(page, 'tanaka', 'not-the-password');
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
    // The new coupon is printed at the desk: the resident's details, the 18 digits and the
    // QR code the node draws (a 45-module symbol at 6 pixels a module); the old one has no
    // print button.
    const fresh = page.locator('#resident-coupons tbody tr', { hasText: '有効' }).filter({ hasNotText: '無効' });
    const freshCode = await fresh.getAttribute('data-coupon');
    assert.equal(await page.locator('#resident-coupons button[data-action=print]').count(), 1);
    await page.evaluate(() => { window.print = () => { window.printed = true; }; });
    await fresh.locator('button[data-action=print]').click();
    await page.locator('#print-dialog').waitFor({ state: 'visible' });
    assert.equal(await page.evaluate(() => document.querySelector('#print-qr').naturalWidth), 270);
    assert.match(await page.textContent('#print-facts'), new RegExp(`${freshCode}`));
    assert.match(await page.textContent('#print-place'), /横浜市/);
    await page.click('#print-go');
    assert.ok(await page.evaluate(() => window.printed === true), 'the browser was asked to print');
    await page.screenshot({ path: join(shots, 'coupon-print.png'), fullPage: true });
    await page.click('#print-close');
    await page.locator('#print-dialog').waitFor({ state: 'hidden' });

    // The demo's spare coupon, scanned into the search, finds its holder (a clerk at the
    // desk with the resident's coupon in hand).
    await page.goto(`${base}/ui/#/search`);
    await page.fill('#search-coupon', coupon);
    await page.press('#search-coupon', 'Enter');
    await page.locator('#search-results tbody tr').first().waitFor();
    assert.equal(await page.locator('#search-results tbody tr').count(), 1);

    // 7. Reception: scan the coupon (the scanner ends with Enter), then the vial.
    await page.click('#nav a[href="#/capture"]');
    // The page is ready when the cursor waits in the coupon field (after the venue list).
    await page.waitForFunction(() => document.activeElement && document.activeElement.id === 'capture-coupon');
    await page.fill('#capture-venue', 'yokohama-arena');
    assert.equal(await page.inputValue('#capture-venue'), 'yokohama-arena');
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
    await logIn(page, 'kanri', password);
    await page.locator('#view-search').waitFor({ state: 'visible' });
    await page.click('#nav a[href="#/handoffs"]');
    await page.locator('#handoffs-outgoing tbody tr', { hasText: '東京都 千代田区（131016）' }).first().waitFor();
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
    await page.fill('#move-to', '131017');
    await page.locator('#move-to-name', { hasText: '該当する市区町村がありません' }).waitFor();
    await page.fill('#move-to', '131016');
    await page.locator('#move-to-name', { hasText: '東京都 千代田区（131016）' }).waitFor();
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

    // 11. Vaccines and stock: the demo's venues with what was delivered and used; a delivery
    // recorded here adds up; wastage without a reason is refused, naming the field; a lot is
    // registered; a venue's opening days are changed.
    await page.click('#nav a[href="#/stock"]');
    const arena = page.locator('#stock-table tbody tr[data-venue="yokohama-arena"]');
    await arena.waitFor();
    const cells = async (locator) => locator.locator('td').allTextContents();
    let figures = await cells(arena);
    assert.equal(figures[3], '780', 'delivered to the arena by the demo');
    // Of the arena's three doses, the demo voided one and the clerk another (step 5).
    assert.equal(figures[4], '1', 'valid doses given at the arena');
    assert.equal(Number(figures[6].replace(/,/g, '')), 780 - Number(figures[4]), 'on hand = delivered − used');
    await page.selectOption('#stock-kind', 'delivery');
    await page.fill('#stock-venue', 'yokohama-arena');
    await page.fill('#stock-doses', '390');
    await page.click('#stock-form button[type=submit]');
    await page.locator('#message.ok', { hasText: '在庫を記録しました' }).waitFor();
    figures = await cells(arena);
    assert.equal(figures[3], '1,170');
    assert.equal(figures[7], '0', 'nothing allocated is awaiting delivery');
    await page.selectOption('#stock-kind', 'wastage');
    await page.fill('#stock-venue', 'yokohama-arena');
    await page.fill('#stock-doses', '6');
    await page.click('#stock-form button[type=submit]');
    await page.locator('#message:not(.ok)', { hasText: '[reason]' }).waitFor();
    assert.match(await message.textContent(), /廃棄には理由が必要です/);
    await page.fill('#lot-number', 'UI0001');
    await page.selectOption('#lot-product', '04987000002011');
    await page.fill('#lot-expiry', '2027-06-30');
    await page.click('#lot-form button[type=submit]');
    await page.locator('#lots-table tbody tr', { hasText: 'UI0001' }).filter({ hasText: 'スパイクバックス' }).waitFor();
    const hall = page.locator('#venues-table tbody tr[data-venue="shin-yokohama-hall"]');
    await hall.locator('button[data-action=edit-venue]').click();
    assert.equal(await page.inputValue('#venue-name'), '新横浜公会堂');
    await page.uncheck('#venue-weekdays input[value="sun"]');
    await page.fill('#venue-dates', '2027-01-03');
    await page.click('#venue-form button[type=submit]');
    await page.locator('#message.ok', { hasText: '会場を保存しました' }).waitFor();
    assert.equal(await hall.locator('td').nth(4).textContent(), '火・木・土・2027-01-03');
    await page.screenshot({ path: join(shots, 'stock.png'), fullPage: true });

    // 12. Users and devices: a short password is refused; a venue operator is added, disabled
    // and enabled again, and given a new password; an API token and a terminal's enrolment
    // token are each shown once; the API token is revoked; the enrolment token enrols a
    // terminal (`vrs-node init --role terminal --enroll`), which is then revoked.
    await page.click('#nav a[href="#/admin"]');
    await page.locator('#users-table tbody tr[data-user="tanaka"]').waitFor();
    await page.fill('#user-name', 'uketsuke');
    await page.selectOption('#user-role', 'venue_operator');
    await page.fill('#user-password', 'short');
    await page.fill('#user-venues', 'yokohama-arena');
    await page.click('#user-form button[type=submit]');
    await page.locator('#message:not(.ok)', { hasText: '12〜128文字' }).waitFor();
    await page.fill('#user-password', 'first-password-2026');
    await page.click('#user-form button[type=submit]');
    const operator = page.locator('#users-table tbody tr[data-user="uketsuke"]');
    await operator.waitFor();
    assert.deepEqual((await cells(operator)).slice(1, 3), ['会場担当', 'yokohama-arena']);
    page.once('dialog', (dialog) => dialog.accept());
    await operator.locator('button[data-action=disable]').click();
    await page.locator('#message.ok', { hasText: '停止しました' }).waitFor();
    assert.equal(await operator.locator('td').nth(4).textContent(), '停止中');
    await operator.locator('button[data-action=enable]').click();
    await page.locator('#message.ok', { hasText: '再開しました' }).waitFor();
    await operator.locator('button[data-action=reset-password]').click();
    assert.ok(await page.locator('#password-fields').isVisible() && (await page.locator('#reason-fields').isHidden()));
    await page.fill('#password-new', 'second-password-2026');
    await page.click('#reason-ok');
    await page.locator('#message.ok', { hasText: 'パスワードを再設定しました' }).waitFor();
    await page.fill('#token-name', 'hall-tablet-1');
    await page.selectOption('#token-role', 'venue_operator');
    await page.fill('#token-venues', 'shin-yokohama-hall');
    await page.fill('#token-days', '30');
    await page.click('#token-form button[type=submit]');
    await page.locator('#secret-box').waitFor({ state: 'visible' });
    assert.match(await page.textContent('#secret-value'), /^vrs_t_[0-9a-f]{64}$/);
    const tablet = page.locator('#tokens-table tbody tr[data-token="hall-tablet-1"]');
    page.once('dialog', (dialog) => dialog.accept());
    await tablet.locator('button[data-action=revoke-token]').click();
    await page.locator('#message.ok', { hasText: 'トークンを失効させました' }).waitFor();
    assert.equal(await tablet.locator('td').nth(5).textContent(), '失効済');
    await page.fill('#enrol-venue', 'shin-yokohama-hall');
    await page.click('#enrol-form button[type=submit]');
    // The box still shows the API token until the enrolment token replaces it.
    await page.locator('#secret-value', { hasText: /^vrs_e_/ }).waitFor();
    assert.match(await page.textContent('#secret-value'), /^vrs_e_[0-9a-f]{64}@\/ip4\/.+\/p2p\/12D3Koo/);
    assert.match(await page.textContent('#secret-hint'), /vrs-node init --role terminal --municipality 141003/);
    await page.locator('#enrolments-table tbody tr', { hasText: 'shin-yokohama-hall' }).filter({ hasText: '未使用' }).waitFor();
    await page.screenshot({ path: join(shots, 'admin.png'), fullPage: true });
    // The token shown enrols a real terminal, which the administrator then revokes.
    const enrolment = await page.textContent('#secret-value');
    const terminalPort = await freePort();
    await promisify(execFile)(binary, ['init', '--role', 'terminal', '--municipality', '141003', '--data', join(work, 'terminal'),
      '--plain-http', '--listen', `127.0.0.1:${terminalPort}`, '--enroll', enrolment], { env: { ...process.env, VRS_LOG: 'warn' } });
    await page.reload();
    const terminal = page.locator('#terminals-table tbody tr', { hasText: 'shin-yokohama-hall' });
    await terminal.waitFor();
    assert.equal(await terminal.locator('td').nth(3).textContent(), '接続可');
    const peer = await terminal.getAttribute('data-peer');
    assert.match(peer, /^12D3Koo/);
    await page.locator('#enrolments-table tbody tr', { hasText: peer }).waitFor();
    page.once('dialog', (dialog) => dialog.accept());
    await terminal.locator('button[data-action=revoke-terminal]').click();
    await page.locator('#message.ok', { hasText: '端末を取り消しました' }).waitFor();
    assert.equal(await terminal.locator('td').nth(3).textContent(), '取消済');
    await page.click('#logout');
    await page.locator('#view-login').waitFor({ state: 'visible' });

    // 13. The venue operator logs in with the new password: the reception and the stock of
    // their own venue; they record wastage with a reason, may not allocate, and see no
    // lot or venue forms.
    await logIn(page, 'uketsuke', 'second-password-2026');
    await page.locator('#view-capture').waitFor({ state: 'visible' });
    await page.click('#nav a[href="#/stock"]');
    await arena.waitFor();
    assert.equal(await page.inputValue('#stock-venue'), 'yokohama-arena');
    assert.ok(await page.locator('#stock-kind option[value="allocation"]').isDisabled());
    assert.ok((await page.locator('#lot-form').isHidden()) && (await page.locator('#venue-form').isHidden()));
    await page.selectOption('#stock-kind', 'wastage');
    await page.fill('#stock-doses', '6');
    await page.fill('#stock-reason', '希釈後の残余（閉場時）');
    await page.click('#stock-form button[type=submit]');
    await page.locator('#message.ok', { hasText: '在庫を記録しました' }).waitFor();
    assert.equal((await cells(arena))[5], '6');
    assert.ok(!(await page.locator('#nav a[href="#/admin"]').isVisible()), 'an operator has no user pages');
    await page.click('#logout');
    await page.locator('#view-login').waitFor({ state: 'visible' });

    // 14. A venue terminal (the demo's, at Chiyoda's hall): its operator sees only the
    // reception and the terminal's own log; a Yokohama resident's coupon (reissued through
    // the API for this) is kept on the terminal, then sent, forwarded by Chiyoda's node and
    // recorded by Yokohama's — the log shows it recorded as Yokohama's first dose. The
    // demo prints the terminal's UI and its operator `kaijo`.
    const terminalHttp = printed.match(/the terminal's web UI: http:\/\/(127\.0\.0\.1:\d+)\/ui\//);
    const terminalToken = printed.match(/ terminal (vrs_t_[0-9a-f]+)/);
    const adminToken = printed.match(/トークン \/ token: (vrs_t_[0-9a-f]+)/);
    assert.ok(terminalHttp && terminalToken && adminToken, 'the demo prints the terminal and the tokens');
    const json = async (url, token, method = 'GET', body = undefined) => {
      const response = await fetch(url, {
        method,
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await response.text();
      assert.ok(response.ok, `${method} ${url}: ${response.status} ${text}`);
      return JSON.parse(text);
    };
    const adult = await json(`${base}/api/v1/residents?atena=0001000001`, adminToken[1]);
    const record = await json(`${base}/api/v1/residents/${adult.residents[0].resident_id}`, adminToken[1]);
    const reissued = await json(`${base}/api/v1/coupons/${record.valid_coupons[0].code.slice(8)}/reissue`, adminToken[1], 'POST');
    const terminalBase = `http://${terminalHttp[1]}`;
    const terminalContext = await browser.newContext({ locale: 'ja-JP', timezoneId: 'Asia/Tokyo' });
    const venuePage = await terminalContext.newPage();
    venuePage.on('pageerror', (error) => problems.push(`terminal page error: ${error.message}`));
    await venuePage.goto(`${terminalBase}/`);
    await logIn(venuePage, 'kaijo', password);
    await venuePage.locator('#view-capture').waitFor({ state: 'visible' });
    assert.match(await venuePage.textContent('#who'), /千代田区/);
    const links = await venuePage.locator('#nav a:visible').allTextContents();
    assert.deepEqual(links, ['接種の記録', '端末の記録'], 'a terminal shows only its own pages');
    assert.equal(await venuePage.inputValue('#capture-venue'), 'chiyoda-kumin-hall');
    await venuePage.fill('#capture-coupon', reissued.qr_text);
    await venuePage.press('#capture-coupon', 'Enter');
    await venuePage.fill('#capture-vial', '(01)04987000001014(17)301231(10)CHY0001');
    await venuePage.press('#capture-vial', 'Enter');
    await venuePage.locator('#capture-result', { hasText: '端末に保存しました' }).waitFor();
    await venuePage.click('#nav a[href="#/terminal"]');
    // Newest first: the demo's own capture at this hall is the second row.
    await venuePage.locator('#terminal-table tbody tr').nth(1).waitFor();
    const newest = venuePage.locator('#terminal-table tbody tr').first();
    await venuePage.locator('#terminal-table tbody tr:first-child[data-state="recorded"]').waitFor({ timeout: 60_000 });
    assert.match(await newest.locator('td').nth(3).textContent(), /^記録済：神奈川県 横浜市（141003）・1回目$/);
    assert.equal(await venuePage.locator('#terminal-table tbody tr').count(), 2);
    await venuePage.screenshot({ path: join(shots, 'terminal.png'), fullPage: true });
    // The terminal's administrator manages its local accounts there (no terminals to enrol).
    await json(`${terminalBase}/api/v1/users`, terminalToken[1], 'POST',
      { username: 'hall-admin', role: 'municipal_admin', password });
    await venuePage.click('#logout');
    await venuePage.locator('#view-login').waitFor({ state: 'visible' });
    await logIn(venuePage, 'hall-admin', password);
    await venuePage.locator('#view-capture').waitFor({ state: 'visible' });
    assert.deepEqual(await venuePage.locator('#nav a:visible').allTextContents(), ['接種の記録', '端末の記録', '利用者・端末']);
    await venuePage.click('#nav a[href="#/admin"]');
    await venuePage.locator('#users-table tbody tr[data-user="kaijo"]').waitFor();
    assert.ok(await venuePage.locator('#terminals-part').isHidden());
    await terminalContext.close();

    // 15. The auditor sees the clerk's void in the audit log, and the chain intact.
    await logIn(page, 'kansa', password);
    // The auditor lands on the figures, under the node's own counts.
    await page.locator('#node-status dd').first().waitFor();
    assert.equal(await page.locator('#node-status dd').first().textContent(), '300', 'the demo\'s 300 residents');
    await page.click('#nav a[href="#/audit"]');
    await page.locator('#audit-table tr', { hasText: 'dose.void' }).filter({ hasText: 'user:tanaka' }).first().waitFor();
    await page.locator('#audit-table tr', { hasText: 'coupon.qr' }).filter({ hasText: 'user:tanaka' }).first().waitFor();
    await page.click('#audit-verify');
    await page.locator('#audit-verdict', { hasText: '改ざんなし' }).waitFor();
    assert.ok(!(await page.locator('#nav a[href="#/search"]').isVisible()), 'an auditor does not look residents up');
    await page.screenshot({ path: join(shots, 'audit.png'), fullPage: true });

    // 16. A national analyst opens the national node's page with their token: counts only.
    const nationalHttp = printed.match(/the national figures' web UI \(log in with the token above\): http:\/\/(127\.0\.0\.1:\d+)\/ui\//);
    const analystToken = printed.match(/Bearer (vrs_t_[0-9a-f]+)' 'http:\/\/[0-9.:]+\/api\/v1\/national\/totals/);
    assert.ok(nationalHttp && analystToken, 'the demo prints the national page and the analyst\'s token');
    const nationalContext = await browser.newContext({ locale: 'ja-JP', timezoneId: 'Asia/Tokyo' });
    const analyst = await nationalContext.newPage();
    analyst.on('pageerror', (error) => problems.push(`national page error: ${error.message}`));
    analyst.on('console', (entry) => {
      if (entry.type() === 'error' && !/status of 4\d\d/.test(entry.text())) problems.push(entry.text());
    });
    await analyst.goto(`http://${nationalHttp[1]}/`);
    assert.equal(new URL(analyst.url()).pathname, '/ui/');
    await analyst.locator('#view-login h2', { hasText: 'APIトークンでログイン' }).waitFor();
    // A municipal token is not a national one.
    await analyst.fill('#login-token', adminToken[1]);
    await analyst.click('#login-form button[type=submit]');
    await analyst.locator('#message', { hasText: 'このトークンは使えません' }).waitFor();
    assert.ok(await analyst.locator('#view-figures').isHidden());
    await analyst.fill('#login-token', analystToken[1]);
    await analyst.click('#login-form button[type=submit]');
    await analyst.locator('#totals-sum', { hasText: '期間の合計' }).waitFor();
    await analyst.selectOption('#scope-prefecture', '14');
    await analyst.selectOption('#scope-by', 'dose_number');
    await analyst.click('#scope-form button[type=submit]');
    await analyst.locator('#scope-title', { hasText: '神奈川県' }).waitFor();
    const kanagawa = Number((await analyst.textContent('#totals-sum')).replace(/\D/g, ''));
    assert.ok(kanagawa >= 1, `Yokohama's doses are in Kanagawa's total (${kanagawa})`);
    assert.equal(await analyst.locator('#totals-table tbody tr td').first().textContent(), '1回目');
    assert.match(await analyst.locator('#coverage-table tbody tr td').nth(3).textContent(), /^\d+\.\d %$/);
    assert.match(await analyst.textContent('#freshness-summary'), /^\d+ 市区町村のうち \d+ が 60 分以内に報告していません/);
    const page16 = await analyst.content();
    assert.ok(!page16.includes('0001000001') && !/[ァ-ヶー]{2,}　[ァ-ヶー]{2,}/.test(page16), 'no atena number or kana name on the national page');
    // The day's CSV for Kanagawa, as the browser saves it: Yokohama's line and no one's name.
    await analyst.selectOption('#report-encoding', 'utf-8');
    const [saved] = await Promise.all([analyst.waitForEvent('download'), analyst.click('#report-form button[type=submit]')]);
    assert.match(saved.suggestedFilename(), /^vaccinations-\d{4}-\d{2}-\d{2}-utf-8\.csv$/);
    const csv = readFileSync(await saved.path(), 'utf8').trim().split(/\r?\n/);
    assert.match(csv[0], /^\uFEFF?都道府県コード,都道府県名,市区町村コード,市区町村名,接種日,ワクチン,接種回,接種件数/);
    assert.ok(csv.slice(1).some((line) => line.startsWith('14,神奈川県,141003,横浜市,')), csv.join('\n'));
    await analyst.click('#lang');
    await analyst.locator('#totals-sum', { hasText: 'Total for the period' }).waitFor();
    assert.equal(await analyst.locator('#scope-title').textContent().then((text) => text.startsWith('Kanagawa')), true);
    await analyst.screenshot({ path: join(shots, 'national.png'), fullPage: true });
    await analyst.click('#logout');
    await analyst.locator('#view-login').waitFor({ state: 'visible' });
    assert.equal(await analyst.evaluate(() => sessionStorage.length), 0, 'the token is forgotten at logout');
    await nationalContext.close();

    assert.deepEqual(problems, [], 'the browser reported no script error or policy violation');
    console.log('ui: 16 steps passed (login, search, void, reissue, capture, refusals ja/en, reload, relocation, stock, users and devices, venue operator, venue terminal, audit, national figures)');
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
