// The staff UI: one page, views chosen by the URL's fragment (#/search, #/resident/ID, …).
// Every request goes to the node's own API with the session cookie; writes carry the
// session's CSRF token. Data from the API is only ever put into the page as text.

const TEXT = {
  title: ['ワクチン接種記録システム', 'Vaccination record system'],
  logout: ['ログアウト', 'Log out'],
  'nav.search': ['住民の照会', 'Residents'],
  'nav.capture': ['接種の記録', 'Record a dose'],
  'nav.stats': ['接種件数', 'Daily figures'],
  'nav.audit': ['監査ログ', 'Audit log'],
  'nav.handoffs': ['転出・転入', 'Relocation'],
  'resident.moveOut': ['転出（接種歴を転出先へ引き継ぐ）', 'Move out (hand the history to the new municipality)'],
  'dialog.moveOut': ['この住民の記録を転出先へ引き継ぎます（この市区町村では閲覧のみになります）', 'Hand this record to the new municipality (it becomes read-only here)'],
  'dialog.accept': ['引き継ぎを受け入れます。宛名番号と住所が分かれば入力してください（空欄なら仮の宛名番号を付け、住民記録の取込で置き換えます）', 'Accept this handoff. Give the atena number and address if known (left empty, a provisional atena number is given, and the register extract replaces it)'],
  'done.moveOut': ['引き継ぎを送りました：', 'Handoff sent: '],
  'handoffs.title': ['転出・転入の引き継ぎ', 'Relocation handoffs'],
  'handoffs.askTitle': ['転入の届出：前住所地へ接種歴を照会', 'A newcomer: ask their former municipality for their history'],
  'handoffs.myNumber': ['個人番号（12桁）', 'My Number (12 digits)'],
  'handoffs.previous': ['前住所地の市区町村コード（任意）', 'Former municipality code (optional)'],
  'handoffs.ask': ['照会する', 'Ask'],
  'handoffs.asked': ['照会しました', 'Asked'],
  'handoffs.to': ['転出先の市区町村コード（6桁）', 'New municipality code (6 digits)'],
  'handoffs.incoming': ['転入（受け取った引き継ぎ）', 'Received'],
  'handoffs.outgoing': ['転出（送った引き継ぎ）', 'Sent'],
  'handoffs.asks': ['照会', 'Asks'],
  'handoffs.accept': ['受け入れる', 'Accept'],
  'handoffs.accepted': ['受け入れました', 'Accepted'],
  'handoffs.renumbered': ['接種回を振り直した記録', 'doses renumbered'],
  'handoffs.none': ['なし', 'none'],
  'col.handoff': ['引き継ぎ', 'Handoff'],
  'col.from': ['転出元', 'From'],
  'col.to': ['転出先', 'To'],
  'col.received': ['受信日時', 'Received'],
  'col.resident': ['住民', 'Resident'],
  'col.note': ['備考', 'Note'],
  'col.holder': ['保有する市区町村', 'Held by'],
  'out.sealed': ['封緘済（国へ送信待ち）', 'sealed (to the national node)'],
  'out.deposited': ['国で保管中（転出先の受入待ち）', 'at the national node (awaiting the receiver)'],
  'out.completed': ['引き継ぎ完了', 'completed'],
  'out.refused': ['国が拒否', 'refused by the national node'],
  'in.received': ['受入待ち', 'awaiting acceptance'],
  'in.accepted': ['受入済', 'accepted'],
  'in.failed': ['受入不可', 'cannot be accepted'],
  'ask.asking': ['照会中', 'asking'],
  'ask.waiting': ['前住所地の応答待ち', 'waiting for the holder'],
  'ask.sent': ['送付済', 'sent'],
  'ask.received': ['受領済', 'received'],
  'ask.not_found': ['該当なし', 'not found'],
  'login.title': ['ログイン', 'Log in'],
  'login.username': ['利用者名', 'User name'],
  'login.password': ['パスワード', 'Password'],
  'login.submit': ['ログイン', 'Log in'],
  'search.title': ['住民の照会', 'Find a resident'],
  'search.kana': ['氏名（カナ）', 'Name (kana)'],
  'search.atena': ['宛名番号', 'Atena number'],
  'search.coupon': ['接種券番号（10桁）', 'Coupon number (10 digits)'],
  'search.submit': ['検索', 'Search'],
  'search.none': ['該当する住民はいません', 'No resident matches'],
  'search.empty': ['氏名（カナ）・宛名番号・接種券番号のいずれかを入力してください', 'Enter a kana name, an atena number or a coupon number'],
  'col.atena': ['宛名番号', 'Atena no.'],
  'col.name': ['氏名', 'Name'],
  'col.kana': ['カナ', 'Kana'],
  'col.birth': ['生年月日', 'Born'],
  'col.doses': ['接種回数', 'Doses'],
  'col.status': ['状態', 'Status'],
  'col.dose': ['回', 'Dose'],
  'col.date': ['接種日', 'Date'],
  'col.product': ['製品', 'Product'],
  'col.lot': ['ロット', 'Lot'],
  'col.venue': ['会場', 'Venue'],
  'col.coupon': ['接種券番号（18桁）', 'Coupon (18 digits)'],
  'col.generation': ['発行世代', 'Generation'],
  'col.issued': ['発行日時', 'Issued'],
  'col.at': ['日時', 'When'],
  'col.kind': ['種別', 'Kind'],
  'col.reason': ['理由', 'Reason'],
  'col.actor': ['実施者', 'By'],
  'col.age': ['年齢層', 'Age band'],
  'col.sex': ['性別', 'Sex'],
  'col.count': ['件数', 'Count'],
  'col.action': ['操作', 'Action'],
  'col.subject': ['対象', 'Subject'],
  'col.outcome': ['結果', 'Outcome'],
  'resident.title': ['住民の接種記録', 'Vaccination record'],
  'resident.history': ['接種歴', 'Doses'],
  'resident.coupons': ['接種券', 'Coupons'],
  'resident.corrections': ['訂正の履歴', 'Corrections'],
  'resident.next': ['次の接種', 'Next dose'],
  'resident.address': ['住所', 'Address'],
  'resident.id': ['住民ID', 'Resident id'],
  'resident.moved': ['転出済み（記録は閲覧のみ）', 'Moved away (the record is read-only)'],
  'resident.nohistory': ['接種歴はありません', 'No doses'],
  'dose.void': ['取消', 'Void'],
  'dose.amend': ['修正', 'Amend'],
  'coupon.reissue': ['再発行', 'Reissue'],
  'coupon.revoke': ['失効', 'Revoke'],
  'status.valid': ['有効', 'valid'],
  'status.voided': ['取消済', 'voided'],
  'status.used': ['使用済', 'used'],
  'status.superseded': ['再発行により無効', 'superseded'],
  'status.revoked': ['失効', 'revoked'],
  'status.active': ['在住', 'resident'],
  'status.deceased': ['死亡', 'deceased'],
  'status.moved_out': ['転出', 'moved out'],
  'status.moved_within': ['市内転居', 'moved within'],
  'sex.male': ['男', 'male'],
  'sex.female': ['女', 'female'],
  'kind.void': ['取消', 'void'],
  'kind.amend': ['修正', 'amend'],
  'col.change': ['変更内容', 'Change'],
  'field.vaccinated_on': ['接種日', 'date'],
  'field.status': ['状態', 'status'],
  'field.dose_number': ['接種回', 'dose'],
  'field.venue': ['会場', 'venue'],
  'field.lot': ['ロット', 'lot'],
  'field.gtin': ['GTIN', 'GTIN'],
  'field.product_code': ['製品', 'product'],
  'field.expiry': ['有効期限', 'expiry'],
  'dialog.reason': ['理由（必須・記録の訂正履歴に残ります）', 'Reason (required; kept in the record\u2019s corrections)'],
  'dialog.cancel': ['やめる', 'Cancel'],
  'dialog.ok': ['実行', 'Go'],
  'dialog.void': ['この接種記録を取り消します', 'Void this dose'],
  'dialog.amend': ['この接種記録を修正します（変える項目だけ入力）', 'Amend this dose (fill in only what changes)'],
  'dialog.revoke': ['この接種券を失効させます', 'Revoke this coupon'],
  'done.void': ['取り消しました', 'Voided'],
  'done.amend': ['修正しました', 'Amended'],
  'done.revoke': ['失効させました', 'Revoked'],
  'done.reissue': ['再発行しました。新しい接種券：', 'Reissued. New coupon: '],
  'confirm.reissue': ['この接種券を再発行しますか？（古い券はすぐに無効になります）', 'Reissue this coupon? (the old one stops being valid at once)'],
  'capture.title': ['接種の記録', 'Record a dose'],
  'capture.help': ['接種券のQRコードとワクチンのバーコードをスキャナーで読み取ってください。', 'Scan the coupon\u2019s QR code and the vial\u2019s barcode.'],
  'capture.venue': ['会場', 'Venue'],
  'capture.coupon': ['接種券（QR または 18桁）', 'Coupon (QR or 18 digits)'],
  'capture.vial': ['ワクチン（GS1 バーコード）', 'Vaccine (GS1 barcode)'],
  'capture.date': ['接種日', 'Date given'],
  'capture.submit': ['記録する', 'Record'],
  'capture.recorded': ['記録しました', 'Recorded'],
  'capture.replay': ['この接種は記録済みです', 'Already recorded'],
  'capture.pending': ['端末に保存しました（送信待ち）', 'Kept on the terminal (to be sent)'],
  'capture.dose': ['回目', ''],
  'stats.title': ['接種件数（日別）', 'Doses per day'],
  'stats.date': ['日付', 'Date'],
  'stats.submit': ['表示', 'Show'],
  'stats.total': ['合計', 'Total'],
  'stats.unsent': ['国へ未送信の集計', 'figures not yet sent to the national node'],
  'audit.title': ['監査ログ', 'Audit log'],
  'audit.verify': ['改ざん検査', 'Verify the chain'],
  'audit.intact': ['改ざんなし', 'intact'],
  'audit.broken': ['改ざんの疑いあり', 'NOT intact'],
  'audit.entries': ['件', 'entries'],
  'error.network': ['ノードに接続できません', 'Cannot reach the node'],
};

let lang = localStorage.getItem('vrs.lang') === 'en' ? 'en' : 'ja';
let me = null;

const $ = (selector) => document.querySelector(selector);
const t = (key) => (TEXT[key] || [key, key])[lang === 'en' ? 1 : 0];
const label = (prefix, value) => (TEXT[`${prefix}.${value}`] ? t(`${prefix}.${value}`) : String(value ?? ''));

/** A refusal from the API, in the language shown. */
class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem && (lang === 'en' ? problem.detail_en : problem.detail_ja);
    const field = problem && problem.field ? ` [${problem.field}]` : '';
    super(detail ? `${detail}${field}` : `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(method, path, body) {
  const headers = { 'Accept-Language': lang };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && me && me.csrf_token) headers['X-CSRF-Token'] = me.csrf_token;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new Error(t('error.network'));
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    if (response.status === 401 && me) {
      me = null;
      localStorage.removeItem('vrs.session');
      show('login');
    }
    throw new ApiError(response.status, data);
  }
  return { status: response.status, data };
}

/** An element with text content (never parsed as HTML). */
function el(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const cell of cells) {
    const td = document.createElement('td');
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell ?? '';
    tr.append(td);
  }
  return tr;
}

function button(key, onClick, name) {
  const b = el('button', t(key), { type: 'button', 'data-action': name || key });
  b.addEventListener('click', onClick);
  return b;
}

function say(text, ok = false) {
  const box = $('#message');
  box.textContent = text;
  box.className = ok ? 'ok' : '';
  box.hidden = !text;
}

function localDate(at) {
  return at ? new Date(at).toLocaleString(lang === 'en' ? 'en-GB' : 'ja-JP') : '';
}

function today() {
  const now = new Date();
  const pad = (n) => String(n).padStart(2, '0');
  return `${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}`;
}

function mayDo(roles) {
  return me && roles.split(' ').includes(me.role);
}

function translate() {
  document.documentElement.lang = lang;
  document.title = t('title');
  for (const node of document.querySelectorAll('[data-i18n]')) node.textContent = t(node.dataset.i18n);
  $('#lang').textContent = lang === 'en' ? '日本語' : 'English';
  if (me) {
    const role = lang === 'en' ? me.role : me.role_ja;
    const place = me.municipality_name ? `${me.municipality_name}（${me.municipality}）` : me.municipality;
    $('#who').textContent = `${place} · ${me.actor} · ${role}`;
  } else {
    $('#who').textContent = '';
  }
}

function show(view) {
  for (const section of document.querySelectorAll('main > section')) {
    section.hidden = section.id !== `view-${view}`;
  }
  $('#nav').hidden = !me;
  $('#logout').hidden = !me;
  for (const link of document.querySelectorAll('#nav a')) {
    link.hidden = !mayDo(link.dataset.roles);
    if (link.getAttribute('href') === `#/${view}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  translate();
}

// ---- views ---------------------------------------------------------------------------

async function route() {
  say('');
  if (!me) {
    show('login');
    $('#login-username').focus();
    return;
  }
  const [, view, id] = (location.hash || '').split('/');
  try {
    if (view === 'resident' && id) await showResident(decodeURIComponent(id));
    else if (view === 'capture') await showCapture();
    else if (view === 'stats') await showStats();
    else if (view === 'audit') await showAudit();
    else if (view === 'handoffs') await showHandoffs();
    else if (view === 'search' || mayDo('municipal_admin clerk call_centre')) show('search');
    else if (mayDo('venue_operator')) location.hash = '#/capture';
    else location.hash = '#/stats';
  } catch (error) {
    say(error.message);
  }
}

async function login(event) {
  event.preventDefault();
  const username = $('#login-username').value.trim();
  const password = $('#login-password').value;
  try {
    await api('POST', '/api/v1/auth/login', { username, password });
    $('#login-password').value = '';
    localStorage.setItem('vrs.session', '1');
    await loadMe();
    await route();
  } catch (error) {
    say(error.message);
  }
}

async function logout() {
  try {
    await api('POST', '/api/v1/auth/logout');
  } catch {
    // The session is forgotten here either way.
  }
  me = null;
  localStorage.removeItem('vrs.session');
  location.hash = '';
  show('login');
}

async function loadMe() {
  const { data } = await api('GET', '/api/v1/auth/me');
  me = data;
}

async function search(event) {
  event.preventDefault();
  const fields = [['atena', '#search-atena'], ['coupon', '#search-coupon'], ['kana', '#search-kana']];
  const given = fields.map(([name, id]) => [name, $(id).value.trim()]).find(([, value]) => value);
  const table = $('#search-results');
  table.hidden = true;
  if (!given) {
    say(t('search.empty'));
    return;
  }
  try {
    const { data } = await api('GET', `/api/v1/residents?${given[0]}=${encodeURIComponent(given[1])}`);
    const body = table.querySelector('tbody');
    body.replaceChildren();
    say(data.residents.length ? '' : t('search.none'));
    for (const r of data.residents) {
      const tr = row([r.atena_number, r.name, r.name_kana, r.birth_date, r.doses, label('status', r.status)]);
      tr.className = 'clickable';
      tr.tabIndex = 0;
      const open = () => { location.hash = `#/resident/${encodeURIComponent(r.resident_id)}`; };
      tr.addEventListener('click', open);
      tr.addEventListener('keydown', (e) => { if (e.key === 'Enter') open(); });
      body.append(tr);
    }
    table.hidden = data.residents.length === 0;
  } catch (error) {
    say(error.message);
  }
}

async function showResident(id) {
  const { data: r } = await api('GET', `/api/v1/residents/${encodeURIComponent(id)}`);
  show('resident');
  const readOnly = Boolean(r.transfer);
  const staff = mayDo('municipal_admin clerk') && !readOnly;
  $('#resident-name').textContent = `${r.identity.name}（${r.identity.name_kana}）`;
  const facts = $('#resident-identity');
  facts.replaceChildren();
  const fact = (key, value) => facts.append(el('dt', t(key)), el('dd', value));
  fact('col.atena', r.identity.atena_number);
  fact('col.birth', r.identity.birth_date);
  fact('col.sex', label('sex', r.identity.sex));
  fact('resident.address', r.identity.address);
  fact('col.status', readOnly ? `${t('resident.moved')} → ${r.transfer.to}` : label('status', r.identity.status));
  fact('resident.next', `${r.next_dose}${lang === 'en' ? '' : t('capture.dose')}`);
  fact('resident.id', r.resident_id);
  const moveOut = $('#resident-move-out');
  moveOut.hidden = !(mayDo('municipal_admin') && !readOnly && r.identity.status !== 'deceased');
  moveOut.onclick = () => moveOutResident(r);

  const history = $('#resident-history tbody');
  history.replaceChildren();
  if (r.history.length === 0) history.append(row([t('resident.nohistory')]));
  for (const dose of r.history) {
    const actions = document.createElement('span');
    if (staff && dose.status === 'valid') {
      actions.append(
        button('dose.void', () => voidDose(r, dose), 'void'),
        ' ',
        button('dose.amend', () => amendDose(r, dose), 'amend'),
      );
    }
    const tr = row([dose.dose_number, dose.vaccinated_on, dose.product_code, dose.lot, dose.venue,
      label('status', dose.status), actions]);
    tr.dataset.event = dose.event_id;
    if (dose.status !== 'valid') tr.className = 'voided';
    history.append(tr);
  }

  const coupons = $('#resident-coupons tbody');
  coupons.replaceChildren();
  const list = Object.values(r.coupons).sort((a, b) => a.code.localeCompare(b.code) || a.generation - b.generation);
  for (const coupon of list) {
    const actions = document.createElement('span');
    if (staff && coupon.status === 'valid' && coupon.code.slice(2, 8) === r.municipality) {
      actions.append(
        button('coupon.reissue', () => reissue(r, coupon), 'reissue'),
        ' ',
        button('coupon.revoke', () => revoke(r, coupon), 'revoke'),
      );
    }
    const why = coupon.status_reason ? `（${coupon.status_reason}）` : '';
    const tr = row([coupon.code, coupon.generation, localDate(coupon.issued_at), label('status', coupon.status) + why, actions]);
    tr.dataset.coupon = coupon.code;
    coupons.append(tr);
  }

  const corrections = $('#resident-corrections tbody');
  corrections.replaceChildren();
  const all = Object.values(r.corrections).sort((a, b) => String(a.at).localeCompare(String(b.at)));
  const value = (field, v) => {
    if (v === undefined || v === null) return '—';
    if (field === 'status') return label('status', v);
    return typeof v === 'object' ? JSON.stringify(v) : String(v);
  };
  const change = (c) => Object.keys(c.after || {})
    .map((field) => `${label('field', field)}: ${value(field, (c.before || {})[field])} → ${value(field, c.after[field])}`)
    .join(' / ');
  for (const c of all) corrections.append(row([localDate(c.at), label('kind', c.kind), change(c), c.reason, c.actor]));
}

/**
 * Asks for a reason and, by `kind`, more: the new values to amend a dose (`amend`), the new
 * municipality to move a resident out (`move`), or — instead of a reason — the 宛名番号 and
 * address to accept a handoff with (`accept`). Resolves to the answers, or null if cancelled.
 */
function askReason(titleKey, kind = 'reason') {
  const dialog = $('#reason-dialog');
  const amend = kind === 'amend';
  const move = kind === 'move';
  const accept = kind === 'accept';
  $('#reason-title').textContent = t(titleKey);
  $('#amend-fields').hidden = !amend;
  $('#move-fields').hidden = !move;
  $('#accept-fields').hidden = !accept;
  $('#reason-fields').hidden = accept;
  $('#reason-text').required = !accept;
  $('#move-to').required = move;
  const fields = ['#reason-text', '#amend-date', '#amend-venue', '#amend-vial', '#move-to', '#accept-atena', '#accept-address'];
  for (const id of fields) $(id).value = '';
  translate();
  return new Promise((resolve) => {
    const form = $('#reason-form');
    let settled = false;
    // Settles once, whichever comes first: the form, the cancel button, or Escape (which
    // closes the dialog without either).
    const finish = (answer) => {
      if (settled) return;
      settled = true;
      form.removeEventListener('submit', submit);
      $('#reason-cancel').removeEventListener('click', cancel);
      dialog.removeEventListener('close', cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const submit = (event) => {
      event.preventDefault();
      const reason = $('#reason-text').value.trim();
      if (!reason && !accept) return;
      finish({
        reason,
        atena_number: $('#accept-atena').value.trim() || undefined,
        address: $('#accept-address').value.trim() || undefined,
        vaccinated_on: $('#amend-date').value || undefined,
        venue: $('#amend-venue').value.trim() || undefined,
        vial: $('#amend-vial').value.trim() || undefined,
        to: $('#move-to').value.trim() || undefined,
      });
    };
    const cancel = () => finish(null);
    form.addEventListener('submit', submit);
    $('#reason-cancel').addEventListener('click', cancel);
    dialog.addEventListener('close', cancel);
    dialog.showModal();
    $(amend ? '#amend-date' : move ? '#move-to' : accept ? '#accept-atena' : '#reason-text').focus();
  });
}

async function afterChange(r, doneKey, extra = '') {
  await showResident(r.resident_id);
  say(`${t(doneKey)}${extra}`, true);
}

async function voidDose(r, dose) {
  const answer = await askReason('dialog.void');
  if (!answer) return;
  try {
    const path = `/api/v1/residents/${encodeURIComponent(r.resident_id)}/doses/${encodeURIComponent(dose.event_id)}/void`;
    await api('POST', path, { reason: answer.reason });
    await afterChange(r, 'done.void');
  } catch (error) {
    say(error.message);
  }
}

async function amendDose(r, dose) {
  const answer = await askReason('dialog.amend', 'amend');
  if (!answer) return;
  try {
    const path = `/api/v1/residents/${encodeURIComponent(r.resident_id)}/doses/${encodeURIComponent(dose.event_id)}/amend`;
    await api('POST', path, answer);
    await afterChange(r, 'done.amend');
  } catch (error) {
    say(error.message);
  }
}

async function reissue(r, coupon) {
  if (!window.confirm(t('confirm.reissue'))) return;
  try {
    const { data } = await api('POST', `/api/v1/coupons/${coupon.code.slice(8)}/reissue`);
    const fresh = data && data.coupon;
    await afterChange(r, 'done.reissue', fresh ? `${fresh.code}（${t('col.generation')} ${fresh.generation}）` : '');
  } catch (error) {
    say(error.message);
  }
}

async function revoke(r, coupon) {
  const answer = await askReason('dialog.revoke');
  if (!answer) return;
  try {
    await api('POST', `/api/v1/coupons/${coupon.code.slice(8)}/revoke`, { reason: answer.reason });
    await afterChange(r, 'done.revoke');
  } catch (error) {
    say(error.message);
  }
}

async function moveOutResident(r) {
  const answer = await askReason('dialog.moveOut', 'move');
  if (!answer) return;
  try {
    const { data } = await api('POST', `/api/v1/residents/${encodeURIComponent(r.resident_id)}/move-out`, {
      to: answer.to,
      reason: answer.reason,
    });
    await afterChange(r, 'done.moveOut', `${data.handoff_id}（${label('out', data.state)}）`);
  } catch (error) {
    say(error.message);
  }
}

function residentLink(id) {
  if (!id) return '';
  return el('a', id, { href: `#/resident/${encodeURIComponent(id)}` });
}

async function showHandoffs() {
  show('handoffs');
  const { data } = await api('GET', '/api/v1/handoffs');
  const incoming = $('#handoffs-incoming tbody');
  incoming.replaceChildren(...data.incoming.map((h) => {
    const notes = [];
    if (h.error) notes.push(h.error);
    if (h.coupon) notes.push(`${t('resident.coupons')} ${h.coupon}`);
    if (h.renumbered && h.renumbered.length) notes.push(`${t('handoffs.renumbered')}: ${h.renumbered.length}`);
    const actions = document.createElement('span');
    if (h.state === 'received' || h.state === 'failed') actions.append(button('handoffs.accept', () => acceptHandoff(h), 'accept'));
    const tr = row([h.handoff_id, h.from, label('in', h.state), localDate(h.received_at), residentLink(h.resident_id), notes.join(' / '), actions]);
    tr.dataset.handoff = h.handoff_id;
    return tr;
  }));
  if (!data.incoming.length) incoming.append(row([t('handoffs.none')]));
  const outgoing = $('#handoffs-outgoing tbody');
  outgoing.replaceChildren(...data.outgoing.map((h) => {
    const state = label('out', h.state) + (h.refusal ? `（${h.refusal}）` : '');
    const tr = row([h.handoff_id, residentLink(h.resident_id), h.to, state, localDate(h.updated_at || h.created_at), h.reason]);
    tr.dataset.handoff = h.handoff_id;
    return tr;
  }));
  if (!data.outgoing.length) outgoing.append(row([t('handoffs.none')]));
  const asks = $('#handoffs-asks tbody');
  asks.replaceChildren(...data.asks.map((a) => row([a.atena_number, label('ask', a.state), a.holder || '', a.handoff_id || '', localDate(a.updated_at || a.asked_at)])));
  if (!data.asks.length) asks.append(row([t('handoffs.none')]));
}

async function acceptHandoff(h) {
  const answer = await askReason('dialog.accept', 'accept');
  if (!answer) return;
  try {
    const body = {};
    if (answer.atena_number) body.atena_number = answer.atena_number;
    if (answer.address) body.address = answer.address;
    await api('POST', `/api/v1/handoffs/${encodeURIComponent(h.handoff_id)}/accept`, body);
    await showHandoffs();
    say(t('handoffs.accepted'), true);
  } catch (error) {
    say(error.message);
  }
}

async function askHistory(event) {
  event.preventDefault();
  const body = {
    my_number: $('#ask-my-number').value.trim(),
    birth_date: $('#ask-birth').value,
    atena_number: $('#ask-atena').value.trim(),
    address: $('#ask-address').value.trim(),
  };
  const previous = $('#ask-previous').value.trim();
  if (previous) body.previous = previous;
  try {
    await api('POST', '/api/v1/handoffs/requests', body);
    $('#ask-form').reset();
    await showHandoffs();
    say(t('handoffs.asked'), true);
  } catch (error) {
    say(error.message);
  }
}

async function showCapture() {
  show('capture');
  if (!$('#capture-date').value) $('#capture-date').value = today();
  const venues = new Set(me.venues || []);
  if (venues.size === 0 && mayDo('municipal_admin clerk')) {
    try {
      const { data } = await api('GET', '/api/v1/venues');
      for (const record of data.venues || []) if (record.venue && record.venue.id) venues.add(record.venue.id);
    } catch {
      // A venue can still be typed in.
    }
  }
  const list = $('#venue-list');
  list.replaceChildren(...[...venues].map((v) => el('option', null, { value: v })));
  if (!$('#capture-venue').value && venues.size === 1) $('#capture-venue').value = [...venues][0];
  $('#capture-coupon').focus();
}

async function capture(event) {
  event.preventDefault();
  const result = $('#capture-result');
  result.hidden = true;
  const body = {
    coupon: $('#capture-coupon').value.trim(),
    vial: $('#capture-vial').value.trim(),
    venue: $('#capture-venue').value.trim(),
  };
  const date = $('#capture-date').value;
  if (date && date !== today()) body.vaccinated_on = date;
  try {
    const { status, data } = await api('POST', '/api/v1/captures', body);
    let text;
    if (data && data.state === 'pending') text = t('capture.pending');
    else if (status === 200 || (data && data.replay)) text = t('capture.replay');
    else text = t('capture.recorded');
    const number = data && (data.dose_number || (data.event && data.event.dose_number));
    if (number) text += lang === 'en' ? `: dose ${number}` : `：${number}${t('capture.dose')}`;
    result.textContent = text;
    result.hidden = false;
    say('');
    $('#capture-coupon').value = '';
    $('#capture-vial').value = '';
  } catch (error) {
    say(error.message);
  }
  $('#capture-coupon').focus();
}

async function showStats() {
  show('stats');
  if (!$('#stats-date').value) $('#stats-date').value = today();
  await loadStats();
}

async function loadStats(event) {
  if (event) event.preventDefault();
  try {
    const { data } = await api('GET', `/api/v1/statistics/daily?date=${encodeURIComponent($('#stats-date').value)}`);
    const rows = data.statistics.doses || [];
    const body = $('#stats-table tbody');
    body.replaceChildren(...rows.map((d) => row([d.product, d.dose_number, d.age_band, label('sex', d.sex), d.count])));
    const total = rows.reduce((sum, d) => sum + d.count, 0);
    $('#stats-total').textContent =
      `${t('stats.total')}: ${total}` + (data.unsent_documents ? ` · ${t('stats.unsent')}: ${data.unsent_documents}` : '');
  } catch (error) {
    say(error.message);
  }
}

async function showAudit() {
  show('audit');
  $('#audit-verdict').textContent = '';
  const { data: verdict } = await api('GET', '/api/v1/audit/verify');
  const after = Math.max(0, verdict.entries - 100);
  const { data } = await api('GET', `/api/v1/audit?after=${after}&limit=100`);
  const body = $('#audit-table tbody');
  body.replaceChildren(...data.entries.reverse().map((e) => row([e.seq, localDate(e.at), e.actor, e.action, e.subject, e.outcome])));
}

async function verifyAudit() {
  try {
    const { data } = await api('GET', '/api/v1/audit/verify');
    const verdict = $('#audit-verdict');
    verdict.textContent = `${data.intact ? t('audit.intact') : t('audit.broken')} · ${data.entries} ${t('audit.entries')}`;
    for (const finding of data.findings || []) {
      verdict.append(el('br'), `${finding.at ?? ''} ${lang === 'en' ? finding.detail_en : finding.detail_ja}`);
    }
  } catch (error) {
    say(error.message);
  }
}

// ---- start ---------------------------------------------------------------------------

async function start() {
  $('#lang').addEventListener('click', () => {
    lang = lang === 'en' ? 'ja' : 'en';
    localStorage.setItem('vrs.lang', lang);
    route();
  });
  $('#logout').addEventListener('click', logout);
  $('#login-form').addEventListener('submit', login);
  $('#search-form').addEventListener('submit', search);
  $('#capture-form').addEventListener('submit', capture);
  $('#stats-form').addEventListener('submit', loadStats);
  $('#audit-verify').addEventListener('click', verifyAudit);
  $('#ask-form').addEventListener('submit', askHistory);
  // A scanner ends the coupon with Enter: go on to the vial instead of submitting.
  $('#capture-coupon').addEventListener('keydown', (event) => {
    if (event.key === 'Enter') {
      event.preventDefault();
      $('#capture-vial').focus();
    }
  });
  window.addEventListener('hashchange', route);
  // Only ask who is logged in when this browser has logged in: a stranger's first visit would
  // otherwise write a refused request into the audit log.
  if (localStorage.getItem('vrs.session')) {
    try {
      await loadMe();
    } catch {
      me = null;
      localStorage.removeItem('vrs.session');
    }
  }
  await route();
}

start();
