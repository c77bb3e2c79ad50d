// The national node's page: counts only, for national analysts and prefecture staff. It
// holds the national API token in this tab's sessionStorage (gone when the tab closes), sends
// it as a bearer token, and builds every element from text, never from HTML.

const TEXT = {
  title: ['国の集計 — ワクチン接種記録システム', 'National figures — vaccination records'],
  logout: ['ログアウト', 'Log out'],
  'login.title': ['APIトークンでログイン', 'Log in with an API token'],
  'login.help': [
    '国ノードの管理者が発行したトークン（vrs_t_…）を入力してください。トークンはこのタブを閉じると消えます。',
    'Enter the token (vrs_t_…) the national node’s administrator issued you. It is forgotten when this tab closes.',
  ],
  'login.token': ['トークン', 'Token'],
  'login.submit': ['ログイン', 'Log in'],
  'login.refused': ['このトークンは使えません（無効・失効・国ノードのものではない）', 'This token is not accepted (unknown, revoked, or not a national token)'],
  'scope.prefecture': ['範囲', 'Scope'],
  'scope.nation': ['全国', 'The nation'],
  'scope.municipality': ['市区町村コード（任意）', 'Municipality code (optional)'],
  'scope.from': ['期間（から）', 'From'],
  'scope.to': ['期間（まで）', 'To'],
  'scope.by': ['内訳', 'Broken down by'],
  'scope.show': ['表示', 'Show'],
  'by.date': ['接種日', 'Date'],
  'by.product': ['ワクチン', 'Vaccine'],
  'by.dose_number': ['接種回', 'Dose'],
  'by.age_band': ['年齢階級', 'Age band'],
  'by.sex': ['性別', 'Sex'],
  'sex.male': ['男', 'Male'],
  'sex.female': ['女', 'Female'],
  'totals.title': ['接種回数', 'Doses given'],
  'totals.count': ['接種回数', 'Doses'],
  'totals.sum': ['期間の合計', 'Total for the period'],
  'coverage.title': ['接種率（期間の末日時点）', 'Coverage (on the last day of the period)'],
  'coverage.dose': ['接種回', 'Dose'],
  'coverage.vaccinated': ['接種済みの人数', 'People vaccinated'],
  'coverage.population': ['登録人口', 'Registered population'],
  'coverage.rate': ['接種率', 'Rate'],
  'stock.title': ['ワクチンの在庫', 'Vaccine stock'],
  'stock.product': ['ワクチン', 'Vaccine'],
  'stock.received': ['配分', 'Allocated'],
  'stock.used': ['使用', 'Used'],
  'stock.wasted': ['廃棄', 'Wasted'],
  'stock.on_hand': ['在庫', 'On hand'],
  'stock.days': ['残日数', 'Days of supply'],
  'stock.none': ['配分も使用もありません', 'Nothing allocated or used'],
  'report.title': ['日次報告（CSV）', 'Daily report (CSV)'],
  'report.date': ['接種日', 'Date of vaccination'],
  'report.encoding': ['文字コード', 'Encoding'],
  'report.download': ['ダウンロード', 'Download'],
  'freshness.title': ['報告の鮮度', 'How recent the reports are'],
  'freshness.municipality': ['市区町村', 'Municipality'],
  'freshness.last': ['最終報告', 'Last report'],
  'freshness.never': ['報告なし', 'never'],
  'error.network': ['国ノードに接続できません', 'Cannot reach the national node'],
};

// The 47 prefectures in JIS X 0401 order (1 = 北海道 … 47 = 沖縄県).
const PREFECTURES = [
  ['北海道', 'Hokkaido'], ['青森県', 'Aomori'], ['岩手県', 'Iwate'], ['宮城県', 'Miyagi'], ['秋田県', 'Akita'],
  ['山形県', 'Yamagata'], ['福島県', 'Fukushima'], ['茨城県', 'Ibaraki'], ['栃木県', 'Tochigi'], ['群馬県', 'Gunma'],
  ['埼玉県', 'Saitama'], ['千葉県', 'Chiba'], ['東京都', 'Tokyo'], ['神奈川県', 'Kanagawa'], ['新潟県', 'Niigata'],
  ['富山県', 'Toyama'], ['石川県', 'Ishikawa'], ['福井県', 'Fukui'], ['山梨県', 'Yamanashi'], ['長野県', 'Nagano'],
  ['岐阜県', 'Gifu'], ['静岡県', 'Shizuoka'], ['愛知県', 'Aichi'], ['三重県', 'Mie'], ['滋賀県', 'Shiga'],
  ['京都府', 'Kyoto'], ['大阪府', 'Osaka'], ['兵庫県', 'Hyogo'], ['奈良県', 'Nara'], ['和歌山県', 'Wakayama'],
  ['鳥取県', 'Tottori'], ['島根県', 'Shimane'], ['岡山県', 'Okayama'], ['広島県', 'Hiroshima'], ['山口県', 'Yamaguchi'],
  ['徳島県', 'Tokushima'], ['香川県', 'Kagawa'], ['愛媛県', 'Ehime'], ['高知県', 'Kochi'], ['福岡県', 'Fukuoka'],
  ['佐賀県', 'Saga'], ['長崎県', 'Nagasaki'], ['熊本県', 'Kumamoto'], ['大分県', 'Oita'], ['宮崎県', 'Miyazaki'],
  ['鹿児島県', 'Kagoshima'], ['沖縄県', 'Okinawa'],
];

const TOKEN_KEY = 'vrs.national.token';
let lang = localStorage.getItem('vrs.lang') === 'en' ? 'en' : 'ja';
let shown = null; // the last figures, redrawn on a language switch

const $ = (selector) => document.querySelector(selector);
const t = (key) => (TEXT[key] || [key, key])[lang === 'en' ? 1 : 0];
const number = (n) => Number(n).toLocaleString(lang === 'en' ? 'en-GB' : 'ja-JP');

class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem && (lang === 'en' ? problem.detail_en : problem.detail_ja);
    const field = problem && problem.field ? ` [${problem.field}]` : '';
    super(detail ? `${detail}${field}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function request(path) {
  let response;
  try {
    response = await fetch(path, {
      headers: { 'Accept-Language': lang, Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ''}` },
      credentials: 'omit',
    });
  } catch {
    throw new Error(t('error.network'));
  }
  return response;
}

/** A refused answer as an ApiError, with the node's message in the language shown. */
async function refusal(response) {
  let problem = null;
  try {
    problem = await response.json();
  } catch {
    problem = null;
  }
  return new ApiError(response.status, problem);
}

/** The answer's JSON, or the refusal thrown. */
async function api(path) {
  const response = await request(path);
  if (!response.ok) throw await refusal(response);
  return response.json();
}

function say(text, ok = false) {
  const box = $('#message');
  box.textContent = text;
  box.classList.toggle('ok', ok);
  box.hidden = !text;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const cell of cells) {
    const td = document.createElement('td');
    td.textContent = cell ?? '';
    tr.append(td);
  }
  return tr;
}

function fill(selector, rows) {
  const body = $(`${selector} tbody`);
  body.replaceChildren(...rows.map(row));
}

function prefectureName(code) {
  const names = PREFECTURES[code - 1];
  return names ? names[lang === 'en' ? 1 : 0] : String(code);
}

function scopeName(scope) {
  if (!scope || scope.level === 'national') return t('scope.nation');
  if (scope.level === 'prefecture') return prefectureName(scope.prefecture);
  return coded(scope.name ?? '', scope.municipality);
}

/** A name with its code after it, as each language writes it. */
function coded(name, code) {
  return lang === 'en' ? `${name} (${code})` : `${name}（${code}）`;
}

function isoDay(date) {
  // The day in Japan, where every figure is counted.
  return new Date(date.getTime() + 9 * 3600 * 1000).toISOString().slice(0, 10);
}

function applyLanguage() {
  document.documentElement.lang = lang;
  document.title = t('title');
  for (const node of document.querySelectorAll('[data-i18n]')) node.textContent = t(node.dataset.i18n);
  $('#lang').textContent = lang === 'en' ? '日本語' : 'English';
  const select = $('#scope-prefecture');
  const chosen = select.value;
  select.replaceChildren(new Option(t('scope.nation'), ''));
  PREFECTURES.forEach((_, i) => select.append(new Option(`${String(i + 1).padStart(2, '0')} ${prefectureName(i + 1)}`, String(i + 1))));
  select.value = chosen;
  if (shown) draw(shown);
}

function dimension(by, r) {
  switch (by) {
    case 'date': return r.date;
    case 'product': return r.product;
    case 'dose_number': return lang === 'en' ? `Dose ${r.dose_number}` : `${r.dose_number}回目`;
    case 'age_band': return r.age_band;
    case 'sex': return t(`sex.${r.sex}`);
    default: return '';
  }
}

function draw({ by, totals, coverage, stock, freshness }) {
  $('#scope-title').textContent = `${scopeName(totals.scope)}　${totals.from} – ${totals.to}`;
  // A prefecture user who asked for no scope was given their prefecture: show it as chosen.
  if (totals.scope.level === 'prefecture') $('#scope-prefecture').value = String(totals.scope.prefecture);
  $('#totals-key').textContent = t(`by.${by}`);
  $('#totals-sum').textContent = `${t('totals.sum')}${lang === 'en' ? ': ' : '：'}${number(totals.total)}`;
  fill('#totals-table', totals.rows.map((r) => [dimension(by, r), number(r.count)]));
  fill('#coverage-table', coverage.rows.filter((r) => !r.age_band).map((r) => [
    dimension('dose_number', r), number(r.vaccinated), number(r.population), `${(r.rate * 100).toFixed(1)} %`,
  ]));
  const products = stock.products.map((p) => [
    p.product, number(p.received), number(p.used), number(p.wasted), number(p.on_hand),
    p.days_of_supply === null || p.days_of_supply === undefined ? '—' : p.days_of_supply.toFixed(1),
  ]);
  fill('#stock-table', products.length ? products : [[t('stock.none')]]);
  const stale = freshness.rows.filter((r) => r.stale);
  $('#freshness-summary').textContent = lang === 'en'
    ? `${freshness.municipalities} municipalities; ${freshness.stale} have not reported within ${freshness.stale_after_minutes} minutes (listed below, at most 100).`
    : `${freshness.municipalities} 市区町村のうち ${freshness.stale} が ${freshness.stale_after_minutes} 分以内に報告していません（以下、最大100件）。`;
  fill('#freshness-table', stale.slice(0, 100).map((r) => [
    coded(`${r.prefecture} ${r.name}`, r.municipality),
    r.last_report_at ? new Date(r.last_report_at).toLocaleString(lang === 'en' ? 'en-GB' : 'ja-JP') : t('freshness.never'),
  ]));
}

/** The scope chosen in the form, as query parameters ('' for the nation). */
function scopeQuery() {
  const municipality = $('#scope-municipality').value.trim();
  const prefecture = $('#scope-prefecture').value;
  return municipality ? `municipality=${encodeURIComponent(municipality)}` : prefecture ? `prefecture=${prefecture}` : '';
}

async function show() {
  const scope = scopeQuery();
  const from = $('#scope-from').value;
  const to = $('#scope-to').value;
  const by = $('#scope-by').value;
  const join = (query) => [scope, query].filter(Boolean).join('&');
  try {
    const [totals, coverage, stock, freshness] = await Promise.all([
      api(`/api/v1/national/totals?${join(`from=${from}&to=${to}&by=${by}`)}`),
      api(`/api/v1/national/coverage?${join(`as_of=${to}`)}`),
      api(`/api/v1/national/stock?${join(`as_of=${to}`)}`),
      api(`/api/v1/national/freshness?${join('')}`),
    ]);
    shown = { by, totals, coverage, stock, freshness };
    draw(shown);
    say('');
  } catch (error) {
    if (error.status === 401) return logOut(t('login.refused'));
    say(error.message);
  }
}

/** The day's CSV for the scope shown, saved by the browser under its date. */
async function download() {
  const date = $('#report-date').value;
  const encoding = $('#report-encoding').value;
  const scope = scopeQuery();
  try {
    const response = await request(`/api/v1/national/reports/daily?${[scope, `date=${date}&encoding=${encoding}`].filter(Boolean).join('&')}`);
    if (!response.ok) throw await refusal(response);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement('a');
    link.href = url;
    link.download = `vaccinations-${date}-${encoding}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    say('');
  } catch (error) {
    if (error.status === 401) return logOut(t('login.refused'));
    say(error.message);
  }
}

function logOut(message = '') {
  sessionStorage.removeItem(TOKEN_KEY);
  shown = null;
  $('#login-form').reset();
  $('#view-figures').hidden = true;
  $('#logout').hidden = true;
  $('#view-login').hidden = false;
  say(message);
}

function enter() {
  $('#view-login').hidden = true;
  $('#view-figures').hidden = false;
  $('#logout').hidden = false;
  show();
}

document.addEventListener('DOMContentLoaded', () => {
  const today = new Date();
  $('#scope-to').value = isoDay(today);
  $('#scope-from').value = isoDay(new Date(today.getTime() - 6 * 86400 * 1000));
  $('#report-date').value = isoDay(today);
  applyLanguage();
  $('#lang').addEventListener('click', () => {
    lang = lang === 'en' ? 'ja' : 'en';
    localStorage.setItem('vrs.lang', lang);
    applyLanguage();
  });
  $('#logout').addEventListener('click', () => logOut());
  $('#login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('#login-token').value.trim());
    enter();
  });
  $('#scope-form').addEventListener('submit', (event) => {
    event.preventDefault();
    show();
  });
  $('#report-form').addEventListener('submit', (event) => {
    event.preventDefault();
    download();
  });
  if (sessionStorage.getItem(TOKEN_KEY)) enter();
  else logOut();
});
