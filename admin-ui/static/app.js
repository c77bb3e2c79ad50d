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
  'nav.stock': ['ワクチン・在庫', 'Vaccines & stock'],
  'nav.terminal': ['端末の記録', 'This terminal'],
  'terminal.title': ['この端末で記録した接種', 'Doses recorded on this terminal'],
  'terminal.help': ['接種券の市区町村のノードへ接続できるときに送信します。確定していない記録があるあいだ、状態は自動で更新されます。', 'They are sent when the coupon\u2019s municipality can be reached. While a dose waits for its answer, the states update by themselves.'],
  'terminal.captured': ['記録日時', 'Recorded'],
  'terminal.event': ['記録ID', 'Record id'],
  'terminal.pending': ['送信待ち', 'waiting to be sent'],
  'terminal.forwarded': ['送信済（接種券の市区町村の確認待ち）', 'sent (waiting for the coupon\u2019s municipality)'],
  'terminal.recorded': ['記録済', 'recorded'],
  'terminal.replay': ['（記録済みの接種の再送）', ' (a dose recorded before, sent again)'],
  'terminal.refused': ['受付不可', 'refused'],
  'terminal.open': ['未確定', 'not final yet'],
  'terminal.refresh': ['更新', 'Refresh'],
  'terminal.none': ['この端末で記録した接種はまだありません', 'No dose recorded on this terminal yet'],
  'nav.admin': ['利用者・端末', 'Users & devices'],
  'stock.title': ['会場ごとの在庫', 'Stock at each venue'],
  'stock.allocated': ['配分', 'Allocated'],
  'stock.delivered': ['納入', 'Delivered'],
  'stock.used': ['使用', 'Used'],
  'stock.wasted': ['廃棄', 'Wasted'],
  'stock.onHand': ['在庫', 'On hand'],
  'stock.awaiting': ['未納入', 'Awaiting delivery'],
  'stock.daily': ['1日平均（7日間）', 'Per day (7 days)'],
  'stock.days': ['残日数', 'Days left'],
  'stock.none': ['在庫の記録はまだありません', 'No stock recorded yet'],
  'stock.entryTitle': ['在庫の記録（配分・納入・廃棄）', 'Record stock (allocation, delivery, wastage)'],
  'stock.doses': ['回数（回分）', 'Doses'],
  'stock.reason': ['理由（廃棄は必須）', 'Reason (required for wastage)'],
  'stock.record': ['記録する', 'Record'],
  'stock.recorded': ['在庫を記録しました', 'Stock recorded'],
  'stockKind.delivery': ['納入', 'Delivery'],
  'stockKind.wastage': ['廃棄', 'Wastage'],
  'stockKind.allocation': ['会場への配分', 'Allocation to the venue'],
  'lots.title': ['ロット', 'Lots'],
  'lots.number': ['ロット番号', 'Lot number'],
  'lots.add': ['ロットを登録', 'Register the lot'],
  'lots.added': ['ロットを登録しました', 'Lot registered'],
  'lots.expired': ['期限切れ', 'expired'],
  'lots.usable': ['使用可', 'usable'],
  'venues.title': ['接種会場', 'Venues'],
  'venues.id': ['会場ID', 'Venue id'],
  'venues.name': ['名称', 'Name'],
  'venues.days': ['接種日', 'Open on'],
  'venues.dates': ['その他の接種日（YYYY-MM-DD、カンマ区切り）', 'Other dates (YYYY-MM-DD, comma-separated)'],
  'venues.listed': ['公開', 'Listed'],
  'venues.listedLong': ['市民向け一覧に公開する', 'Show in the public listing'],
  'venues.save': ['会場を登録・更新', 'Save the venue'],
  'venues.saved': ['会場を保存しました', 'Venue saved'],
  'venues.edit': ['編集', 'Edit'],
  'venues.none': ['登録された会場はありません', 'No venue registered'],
  'day.mon': ['月', 'Mon'],
  'day.tue': ['火', 'Tue'],
  'day.wed': ['水', 'Wed'],
  'day.thu': ['木', 'Thu'],
  'day.fri': ['金', 'Fri'],
  'day.sat': ['土', 'Sat'],
  'day.sun': ['日', 'Sun'],
  'yes': ['はい', 'yes'],
  'no': ['いいえ', 'no'],
  'users.title': ['利用者', 'Users'],
  'users.role': ['役割', 'Role'],
  'users.venues': ['担当会場', 'Venues'],
  'users.venuesLong': ['担当会場（会場担当のみ、カンマ区切り）', 'Venues (venue operators only, comma-separated)'],
  'users.created': ['登録日時', 'Created'],
  'users.addTitle': ['利用者の追加', 'Add a user'],
  'users.password': ['初期パスワード（12文字以上）', 'Initial password (12 characters or more)'],
  'users.newPassword': ['新しいパスワード（12文字以上）', 'New password (12 characters or more)'],
  'users.add': ['追加する', 'Add'],
  'users.added': ['利用者を追加しました', 'User added'],
  'users.disable': ['停止', 'Disable'],
  'users.enable': ['再開', 'Enable'],
  'users.reset': ['パスワード再設定', 'Reset password'],
  'users.active': ['有効', 'active'],
  'users.disabled': ['停止中', 'disabled'],
  'users.locked': ['ロック中', 'locked until'],
  'users.done.disable': ['利用者を停止しました（ログイン中のセッションも終了）', 'User disabled (their sessions end too)'],
  'users.done.enable': ['利用者を再開しました', 'User enabled'],
  'users.done.reset': ['パスワードを再設定しました（この利用者のセッションはすべて終了）', 'Password reset (every session of the user ended)'],
  'dialog.password': ['パスワードを再設定します', 'Reset the password'],
  'confirm.disable': ['この利用者を停止しますか？（ログイン中のセッションも終了します）', 'Disable this user? (their sessions end too)'],
  'tokens.title': ['APIトークン（端末・連携用）', 'API tokens (devices and integrations)'],
  'tokens.name': ['名前', 'Name'],
  'tokens.expires': ['有効期限', 'Expires'],
  'tokens.addTitle': ['トークンの発行', 'Issue a token'],
  'tokens.days': ['有効日数（空欄は無期限）', 'Valid for days (empty: no expiry)'],
  'tokens.add': ['発行する', 'Issue'],
  'tokens.added': ['トークンを発行しました', 'Token issued'],
  'tokens.revoke': ['失効', 'Revoke'],
  'tokens.revoked': ['失効済', 'revoked'],
  'tokens.expired': ['期限切れ', 'expired'],
  'tokens.never': ['無期限', 'never'],
  'tokens.done.revoke': ['トークンを失効させました', 'Token revoked'],
  'confirm.revokeToken': ['このトークンを失効させますか？（使っている端末は使えなくなります）', 'Revoke this token? (a device using it stops working)'],
  'secret.once': ['この値は今だけ表示されます。安全な方法で端末へ渡してください。', 'This is shown only now. Hand it to the device by a safe route.'],
  'secret.enrolHint': ['会場の端末で次のコマンドを実行します：', 'On the venue\u2019s laptop, run:'],
  'terminals.title': ['会場端末', 'Venue terminals'],
  'terminals.peer': ['端末ID', 'Terminal id'],
  'terminals.issued': ['登録日時', 'Enrolled'],
  'terminals.enrolments': ['登録トークン', 'Enrolment tokens'],
  'terminals.usedBy': ['使用した端末', 'Used by'],
  'terminals.hours': ['有効時間（既定 24 時間）', 'Valid for hours (default 24)'],
  'terminals.enrol': ['登録トークンを発行', 'Issue an enrolment token'],
  'terminals.enrolled': ['登録トークンを発行しました', 'Enrolment token issued'],
  'terminals.unused': ['未使用', 'unused'],
  'terminals.active': ['接続可', 'active'],
  'terminals.revoked': ['取消済', 'revoked'],
  'terminals.revoke': ['取消', 'Revoke'],
  'terminals.done.revoke': ['端末を取り消しました（接続を拒否します）', 'Terminal revoked (its connection is refused)'],
  'confirm.revokeTerminal': ['この端末を取り消しますか？（ノードは接続を拒否します）', 'Revoke this terminal? (the node refuses its connection)'],
  'none': ['なし', 'none'],
  'role.municipal_admin': ['市区町村管理者', 'municipal administrator'],
  'role.clerk': ['職員', 'clerk'],
  'role.call_centre': ['コールセンター', 'call centre'],
  'role.venue_operator': ['会場担当', 'venue operator'],
  'role.auditor': ['監査担当', 'auditor'],
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
  'handoffs.return': ['差し戻す', 'Send back'],
  'handoffs.returned': ['転出元へ差し戻しました', 'Sent back to the sender'],
  'dialog.return': ['この引き継ぎを受け入れず、転出元へ差し戻します（転出元で住民記録が元に戻ります）', 'Do not accept this handoff: send it back to its sender (the resident becomes active there again)'],
  'return.reason': ['差し戻し理由（転出元に伝わります）', 'Reason (the sender sees it)'],
  'return.note': ['メモ（この市区町村にのみ残ります）', 'Note (kept here only)'],
  'return.birth_date_differs': ['生年月日が住民記録と一致しない', 'the birth date differs from our register'],
  'return.already_registered': ['別の引き継ぎで登録済み', 'already registered by another handoff'],
  'return.not_moved_here': ['転入の届出がない', 'no notice of moving in'],
  'return.unreadable': ['引き継ぎデータを開けない', 'the handoff cannot be opened'],
  'return.other': ['その他', 'another reason'],
  'return.ledger_refused': ['国の台帳が受け付けなかった', 'the national ledger refused it'],
  'refusal.not_holder': ['国の台帳では別の市区町村がこの方を担当しています', 'the national ledger says another municipality holds this person'],
  'refusal.not_holder.at': ['国の台帳ではこの方の担当は{place}です', 'the national ledger says {place} holds this person'],
  'refusal.in_transit': ['この方の別の引き継ぎが受入待ちです（後で再送します）', 'another handoff of this person awaits acceptance (sent again later)'],
  'refusal.unknown_receiver': ['転出先が国の名簿にまだありません（後で再送します）', 'the receiver is not in the directory yet (sent again later)'],
  'refusal.unknown_sender': ['この市区町村が国の名簿にまだありません（後で再送します）', 'this municipality is not in the directory yet (sent again later)'],
  'refusal.id_reused': ['引き継ぎIDが別の引き継ぎに使われています', 'the handoff id names another handoff'],
  'refusal.bad_signature': ['署名を国の名簿の鍵で確認できません', 'the signature does not verify with the directory key'],
  'handoffs.renumbered': ['接種回を振り直した記録', 'doses renumbered'],
  'handoffs.none': ['なし', 'none'],
  'place.unknown': ['該当する市区町村がありません', 'no municipality has this code'],
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
  'out.refused': ['国が拒否（住民記録は元に戻りました）', 'refused by the national node (the resident is active here again)'],
  'out.returned': ['転出先が差し戻し（住民記録は元に戻りました）', 'sent back by the receiver (the resident is active here again)'],
  'in.received': ['受入待ち', 'awaiting acceptance'],
  'in.accepted': ['受入済', 'accepted'],
  'in.failed': ['受入不可', 'cannot be accepted'],
  'in.returned': ['差し戻し済', 'sent back'],
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
  'search.coupon': ['接種券（番号10桁・18桁、またはQRを読み取り）', 'Coupon (10 or 18 digits, or scan its QR)'],
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
  'resident.returned': ['戻された転出', 'Move-outs undone'],
  'resident.nohistory': ['接種歴はありません', 'No doses'],
  'dose.void': ['取消', 'Void'],
  'dose.amend': ['修正', 'Amend'],
  'coupon.reissue': ['再発行', 'Reissue'],
  'coupon.revoke': ['失効', 'Revoke'],
  'coupon.print': ['印刷', 'Print'],
  'print.title': ['新型コロナウイルスワクチン 接種券', 'COVID-19 vaccination coupon'],
  'print.print': ['印刷する', 'Print'],
  'print.close': ['閉じる', 'Close'],
  'print.failed': ['接種券のQRコードを取得できませんでした（有効な接種券ではない可能性があります）', 'Could not get the coupon\u2019s QR code (it may no longer be valid)'],
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
  'lots.expiry': ['有効期限', 'Expiry'],
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
  'node.title': ['この市区町村のノード', 'This municipality\u2019s node'],
  'node.residents': ['住民', 'Residents'],
  'node.coupons': ['接種券', 'Coupons'],
  'node.doses': ['接種記録', 'Dose records'],
  'node.terminals': ['登録済みの会場端末', 'Enrolled venue terminals'],
  'node.outbox': ['他の市区町村への転送待ち', 'Waiting to be forwarded to other municipalities'],
  'node.blocked': ['端末に配る無効な券番号', 'Invalid coupon numbers sent to terminals'],
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
    if (response.status === 401 && me) forget();
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

/** The one row of an empty table: the word, across every column. */
function noneRow(tbody, key = 'none') {
  const td = el('td', t(key), { colspan: String(tbody.closest('table').querySelectorAll('thead th').length) });
  const tr = document.createElement('tr');
  tr.append(td);
  tbody.append(tr);
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
    const role = lang === 'en' ? label('role', me.role) : me.role_ja;
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
    // A venue terminal has only the reception and its own log; a node has no terminal log.
    const kind = link.dataset.node || 'municipal';
    link.hidden = !mayDo(link.dataset.roles) || !(kind === 'any' || kind === (me && me.node === 'terminal' ? 'terminal' : 'municipal'));
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
  // A secret shown once stays only while its page is shown (a language switch keeps it).
  if (view !== 'admin') hideSecret();
  try {
    if (view === 'resident' && id) await showResident(decodeURIComponent(id));
    else if (view === 'capture') await showCapture();
    else if (view === 'stats') await showStats();
    else if (view === 'audit') await showAudit();
    else if (view === 'handoffs') await showHandoffs();
    else if (view === 'stock') await showStock();
    else if (view === 'admin') await showAdmin();
    else if (view === 'terminal') await showTerminal();
    else if (me.node === 'terminal') location.hash = mayDo('auditor') ? '#/audit' : '#/capture';
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
  forget();
}

/**
 * Ends the page's session: the page is loaded afresh at the login form, so that nothing the
 * last user saw or typed stays behind in it for the next one at a shared reception PC.
 */
function forget() {
  me = null;
  // Some browsers put a reloaded page's form fields back: empty them first.
  for (const form of document.forms) form.reset();
  localStorage.removeItem('vrs.session');
  history.replaceState(null, '', location.pathname);
  location.reload();
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
  if (readOnly) await loadPlaces();
  const staff = mayDo('municipal_admin clerk') && !readOnly;
  $('#resident-name').textContent = `${r.identity.name}（${r.identity.name_kana}）`;
  const facts = $('#resident-identity');
  facts.replaceChildren();
  const fact = (key, value) => facts.append(el('dt', t(key)), el('dd', value));
  fact('col.atena', r.identity.atena_number);
  fact('col.birth', r.identity.birth_date);
  fact('col.sex', label('sex', r.identity.sex));
  fact('resident.address', r.identity.address);
  fact('col.status', readOnly ? `${t('resident.moved')} → ${place(r.transfer.to)}` : label('status', r.identity.status));
  fact('resident.next', `${r.next_dose}${lang === 'en' ? '' : t('capture.dose')}`);
  if (r.returns && r.returns.length) {
    await loadPlaces();
    const back = r.returns.map((x) => `${place(x.transfer.to)}: ${t(`return.${x.reason}`)}（${localDate(x.at)}）`);
    fact('resident.returned', back.join(' / '));
  }
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
    // Only the node with the coupon key prints (not a standby).
    if (me.node === 'municipal' && mayDo('municipal_admin clerk call_centre') && !readOnly && coupon.status === 'valid' && coupon.code.slice(2, 8) === r.municipality) {
      actions.append(' ', button('coupon.print', () => printCoupon(r, coupon), 'print'));
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
  const password = kind === 'password';
  const back = kind === 'return';
  const noReason = accept || password || back;
  $('#reason-title').textContent = t(titleKey);
  $('#amend-fields').hidden = !amend;
  $('#move-fields').hidden = !move;
  $('#accept-fields').hidden = !accept;
  $('#password-fields').hidden = !password;
  $('#return-fields').hidden = !back;
  $('#reason-fields').hidden = noReason;
  $('#reason-text').required = !noReason;
  $('#move-to').required = move;
  $('#password-new').required = password;
  const fields = ['#reason-text', '#amend-date', '#amend-venue', '#amend-vial', '#move-to', '#accept-atena', '#accept-address', '#password-new', '#return-note'];
  for (const id of fields) $(id).value = '';
  $('#return-reason').selectedIndex = 0;
  $('#move-to-name').textContent = '';
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
      $('#password-new').value = '';
      resolve(answer);
    };
    const submit = (event) => {
      event.preventDefault();
      const reason = $('#reason-text').value.trim();
      if (!reason && !noReason) return;
      finish({
        reason,
        atena_number: $('#accept-atena').value.trim() || undefined,
        address: $('#accept-address').value.trim() || undefined,
        vaccinated_on: $('#amend-date').value || undefined,
        venue: $('#amend-venue').value.trim() || undefined,
        vial: $('#amend-vial').value.trim() || undefined,
        to: $('#move-to').value.trim() || undefined,
        password: $('#password-new').value || undefined,
        return_reason: back ? $('#return-reason').value : undefined,
        note: back ? $('#return-note').value.trim() || undefined : undefined,
      });
    };
    const cancel = () => finish(null);
    form.addEventListener('submit', submit);
    $('#reason-cancel').addEventListener('click', cancel);
    dialog.addEventListener('close', cancel);
    dialog.showModal();
    $(amend ? '#amend-date' : move ? '#move-to' : accept ? '#accept-atena' : password ? '#password-new' : back ? '#return-reason' : '#reason-text').focus();
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

/**
 * Shows the coupon as it is printed for the resident — the municipality, their name, kana,
 * birth date and address, the 18 digits and the signed QR code the node draws — and prints
 * it. The QR image is fetched by the browser from the node (a read of the resident that the
 * audit log records).
 */
async function printCoupon(r, coupon) {
  const dialog = $('#print-dialog');
  const image = $('#print-qr');
  const loaded = new Promise((resolve) => {
    image.onload = () => resolve(true);
    image.onerror = () => resolve(false);
  });
  image.src = `/api/v1/coupons/${encodeURIComponent(coupon.code.slice(8))}/qr?generation=${coupon.generation}`;
  $('#print-place').textContent = me.municipality_name ? `${me.municipality_name}（${me.municipality}）` : me.municipality;
  $('#print-dose').textContent = lang === 'en' ? `Dose ${coupon.code[1]}` : `第${coupon.code[1]}回`;
  const facts = $('#print-facts');
  facts.replaceChildren();
  const fact = (key, value) => facts.append(el('dt', t(key)), el('dd', value));
  fact('col.name', r.identity.name);
  fact('col.kana', r.identity.name_kana);
  fact('col.birth', r.identity.birth_date);
  fact('resident.address', r.identity.address);
  fact('col.coupon', coupon.code);
  fact('col.generation', coupon.generation);
  translate();
  if (!(await loaded)) {
    closePrint();
    say(t('print.failed'));
    return;
  }
  document.body.classList.add('printing-coupon');
  dialog.showModal();
}

/** Closes the coupon and forgets it: nothing of the resident stays in the page. */
function closePrint() {
  const dialog = $('#print-dialog');
  if (dialog.open) dialog.close();
  document.body.classList.remove('printing-coupon');
  $('#print-facts').replaceChildren();
  $('#print-qr').removeAttribute('src');
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

// ---- municipalities -------------------------------------------------------------------

let places = null;
let placesLoading = null;

/** The 1,741 municipalities by code, asked for once (again after a failure). */
async function loadPlaces() {
  if (places) return places;
  if (!placesLoading) {
    placesLoading = api('GET', '/api/v1/municipalities')
      .then(({ data }) => {
        places = new Map(data.municipalities.map((m) => [m.code, m]));
      })
      .catch(() => {
        // Codes are shown alone until the list can be had.
      })
      .finally(() => {
        placesLoading = null;
      });
  }
  await placesLoading;
  return places;
}

/** A municipality as staff read it: prefecture, name and code. */
function place(code) {
  const m = code && places && places.get(code);
  return m ? `${m.prefecture} ${m.name}（${code}）` : code || '';
}

/** Shows, under a field where a code is typed, whose code it is. */
function nameAsTyped(input, output) {
  const show = async () => {
    const code = input.value.trim();
    if (!/^\d{6}$/.test(code)) {
      output.textContent = '';
      return;
    }
    await loadPlaces();
    if (input.value.trim() !== code) return; // typed on meanwhile
    if (!places) output.textContent = '';
    else output.textContent = places.has(code) ? place(code) : t('place.unknown');
  };
  input.addEventListener('input', show);
  return show;
}

function residentLink(id) {
  if (!id) return '';
  return el('a', id, { href: `#/resident/${encodeURIComponent(id)}` });
}

async function showHandoffs() {
  show('handoffs');
  const [{ data }] = await Promise.all([api('GET', '/api/v1/handoffs'), loadPlaces()]);
  const incoming = $('#handoffs-incoming tbody');
  incoming.replaceChildren(...data.incoming.map((h) => {
    const notes = [];
    if (h.error) notes.push(h.error);
    if (h.returned) notes.push(t(`return.${h.returned}`) + (h.return_note ? `（${h.return_note}）` : ''));
    if (h.coupon) notes.push(`${t('resident.coupons')} ${h.coupon}`);
    if (h.renumbered && h.renumbered.length) notes.push(`${t('handoffs.renumbered')}: ${h.renumbered.length}`);
    const actions = document.createElement('span');
    if (h.state === 'received' || h.state === 'failed') {
      actions.append(button('handoffs.accept', () => acceptHandoff(h), 'accept'));
      actions.append(button('handoffs.return', () => returnHandoff(h), 'return'));
    }
    const tr = row([h.handoff_id, place(h.from), label('in', h.state), localDate(h.received_at), residentLink(h.resident_id), notes.join(' / '), actions]);
    tr.dataset.handoff = h.handoff_id;
    return tr;
  }));
  if (!data.incoming.length) noneRow(incoming, 'handoffs.none');
  const outgoing = $('#handoffs-outgoing tbody');
  outgoing.replaceChildren(...data.outgoing.map((h) => {
    const why = h.refusal ? refusalText(h.refusal) : (h.returned ? t(`return.${h.returned}`) : '');
    const state = label('out', h.state) + (why ? `（${why}）` : '');
    const tr = row([h.handoff_id, residentLink(h.resident_id), place(h.to), state, localDate(h.updated_at || h.created_at), h.reason]);
    tr.dataset.handoff = h.handoff_id;
    return tr;
  }));
  if (!data.outgoing.length) noneRow(outgoing, 'handoffs.none');
  const asks = $('#handoffs-asks tbody');
  asks.replaceChildren(...data.asks.map((a) => row([a.atena_number, label('ask', a.state), place(a.holder), a.handoff_id || '', localDate(a.updated_at || a.asked_at)])));
  if (!data.asks.length) noneRow(asks, 'handoffs.none');
}

/** The national ledger's refusal of a deposit (`code: message`), in the language shown:
 * a known code by its label (naming the holder for `not_holder`), any other as sent. */
function refusalText(refusal) {
  const [code, ...rest] = refusal.split(': ');
  const message = rest.join(': ');
  if (code === 'not_holder') {
    const holder = (message.match(/\b\d{6}\b/) || [])[0];
    return holder ? t('refusal.not_holder.at').replace('{place}', place(holder)) : t('refusal.not_holder');
  }
  return TEXT[`refusal.${code}`] ? t(`refusal.${code}`) : refusal;
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

async function returnHandoff(h) {
  const answer = await askReason('dialog.return', 'return');
  if (!answer) return;
  try {
    const body = { reason: answer.return_reason };
    if (answer.note) body.note = answer.note;
    await api('POST', `/api/v1/handoffs/${encodeURIComponent(h.handoff_id)}/return`, body);
    await showHandoffs();
    say(t('handoffs.returned'), true);
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
    $('#ask-previous-name').textContent = '';
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
    const pending = data && data.state && (data.state === 'pending' || data.state.state === 'pending');
    if (pending) text = t('capture.pending');
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
  await loadNodeStatus();
  if (!$('#stats-date').value) $('#stats-date').value = today();
  await loadStats();
}

/** The node's own counts (a municipal node's; a terminal has no figures page). */
async function loadNodeStatus() {
  const facts = $('#node-status');
  facts.replaceChildren();
  const { data } = await api('GET', '/api/v1/status');
  const fact = (key, value) => facts.append(el('dt', t(key)), el('dd', number(value)));
  fact('node.residents', data.residents);
  fact('node.coupons', data.coupons);
  fact('node.doses', data.dose_events);
  fact('node.terminals', data.terminals);
  fact('node.outbox', data.forward_outbox);
  fact('node.blocked', data.blocked_coupons);
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

// ---- a venue terminal's own log ----------------------------------------------------

let terminalTimer = null;

/** The terminal's captures, newest first, refreshed every few seconds while shown. */
async function showTerminal() {
  show('terminal');
  clearTimeout(terminalTimer);
  let open = 0;
  let failed = true;
  try {
    const [{ data }] = await Promise.all([api('GET', '/api/v1/terminal/captures'), loadPlaces()]);
    const captures = data.captures || [];
    const body = $('#terminal-table tbody');
    body.replaceChildren(...captures.map((entry) => {
      const c = entry.capture;
      const s = entry.state;
      const parts = [t(`terminal.${s.state}`)];
      if (s.state === 'recorded') {
        parts.push(`${place(s.owner)}${lang === 'en' ? `, dose ${s.dose_number}` : `・${s.dose_number}回目`}${s.replay ? t('terminal.replay') : ''}`);
      } else if (s.state === 'refused') {
        parts.push(lang === 'en' ? s.message_en : s.message_ja);
      } else if (s.state === 'forwarded') {
        parts.push(place(s.owner));
      }
      const tr = row([localDate(c.captured_at), c.vaccinated_on, c.venue, parts.join(colon()), c.event_id]);
      tr.dataset.event = c.event_id;
      tr.dataset.state = s.state;
      if (s.state === 'refused') tr.classList.add('refused');
      return tr;
    }));
    if (!captures.length) noneRow(body, 'terminal.none');
    open = captures.filter((e) => e.state.state === 'pending' || e.state.state === 'forwarded').length;
    const count = lang === 'en' ? `${captures.length} ${captures.length === 1 ? 'dose' : 'doses'}` : `${captures.length} 件`;
    $('#terminal-summary').textContent = count + (open ? ` · ${t('terminal.open')}: ${open}` : '');
    failed = false;
  } finally {
    // Every read of the log is audited: read it again by itself only while a dose waits for
    // its answer (every 3 s) or after a failed read (in 10 s); 更新 reads it on demand.
    if (open || failed) {
      terminalTimer = setTimeout(() => {
        if (location.hash === '#/terminal' && me) showTerminal().catch((error) => say(error.message));
      }, open ? 3000 : 10000);
    }
  }
}

// ---- vaccines, stock and venues ------------------------------------------------------

const WEEKDAYS = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
const ROLES = ['clerk', 'venue_operator', 'call_centre', 'auditor', 'municipal_admin'];
let catalogue = null;

async function loadCatalogue() {
  if (!catalogue) {
    const { data } = await api('GET', '/api/v1/catalogue');
    catalogue = data.product || [];
  }
  return catalogue;
}

function productName(key) {
  const product = (catalogue || []).find((p) => p.code === key || p.gtin === key);
  if (!product) return key;
  return lang === 'en' ? product.name_en : product.name_ja;
}

/** Fills every product `<select>` (by code, or by GTIN for lots) and the venue form's boxes. */
function fillProducts() {
  for (const select of document.querySelectorAll('select.products')) {
    const byGtin = select.id === 'lot-product';
    const chosen = select.value;
    select.replaceChildren(...catalogue.map((p) => el('option', productName(p.code), { value: byGtin ? p.gtin : p.code })));
    if (chosen) select.value = chosen;
  }
  const checked = new Set([...document.querySelectorAll('#venue-products input:checked')].map((box) => box.value));
  $('#venue-products').replaceChildren(...catalogue.map((p) => checkbox('venue-product', p.code, productName(p.code), checked.has(p.code))));
  const days = new Set([...document.querySelectorAll('#venue-weekdays input:checked')].map((box) => box.value));
  $('#venue-weekdays').replaceChildren(...WEEKDAYS.map((d) => checkbox('venue-day', d, t(`day.${d}`), days.has(d))));
}

function checkbox(name, value, text, checked) {
  const wrap = el('label');
  const box = el('input', null, { type: 'checkbox', name, value });
  box.checked = checked;
  wrap.append(box, ` ${text}`);
  return wrap;
}

/** What separates a message from what it is about, as each language writes it. */
function colon() {
  return lang === 'en' ? ': ' : '：';
}

/** Items joined as each language lists them. */
function joined(items) {
  return (items || []).join(lang === 'en' ? ', ' : '・');
}

function number(value) {
  return value === null || value === undefined ? '' : Number(value).toLocaleString(lang === 'en' ? 'en-GB' : 'ja-JP');
}

async function showStock() {
  show('stock');
  await loadCatalogue();
  fillProducts();
  const [{ data: stock }, { data: venues }] = await Promise.all([api('GET', '/api/v1/stock'), api('GET', '/api/v1/venues')]);
  $('#stock-as-of').textContent = lang === 'en' ? `(as of ${stock.as_of})` : `（${stock.as_of} 時点）`;
  const body = $('#stock-table tbody');
  body.replaceChildren(...stock.venues.map((v) => {
    const tr = row([v.venue, productName(v.product), number(v.allocated), number(v.delivered), number(v.used), number(v.wasted),
      number(v.on_hand), number(v.awaiting_delivery), number(v.daily_use_7d), v.days_of_supply === null ? '—' : number(v.days_of_supply)]);
    if (v.on_hand < 0) tr.classList.add('short');
    tr.dataset.venue = v.venue;
    return tr;
  }));
  if (!stock.venues.length) noneRow(body, 'stock.none');
  // Venue operators record for their own venues; the others choose among the municipality's.
  const ids = mayDo('venue_operator') ? me.venues || [] : (venues.venues || []).map((record) => record.venue.id);
  $('#stock-venue-list').replaceChildren(...ids.map((id) => el('option', null, { value: id })));
  if (!$('#stock-venue').value && ids.length === 1) $('#stock-venue').value = ids[0];
  $('#stock-entry-part').hidden = !mayDo('municipal_admin clerk venue_operator');
  const allocation = $('#stock-kind option[value="allocation"]');
  allocation.hidden = allocation.disabled = !mayDo('municipal_admin');
  $('#lots-part').hidden = !mayDo('municipal_admin clerk venue_operator');
  $('#lot-form').hidden = !mayDo('municipal_admin clerk');
  if (!$('#lots-part').hidden) {
    const { data: lots } = await api('GET', '/api/v1/lots');
    const now = today();
    $('#lots-table tbody').replaceChildren(...lots.lots.map((l) => {
      const tr = row([l.lot, productName(l.gtin), l.gtin, l.expiry, l.expiry < now ? t('lots.expired') : t('lots.usable')]);
      if (l.expiry < now) tr.classList.add('voided');
      return tr;
    }));
  }
  const listed = venues.venues || [];
  $('#venues-table tbody').replaceChildren(...listed.map((record) => {
    const v = record.venue;
    const days = joined((v.opening_days || []).map((d) => (WEEKDAYS.includes(d) ? t(`day.${d}`) : d)));
    const edit = mayDo('municipal_admin') ? button('venues.edit', () => editVenue(record), 'edit-venue') : '';
    const tr = row([v.id, v.name, v.address, joined((v.products || []).map(productName)), days, record.listed ? t('yes') : t('no'), edit]);
    tr.dataset.venue = v.id;
    return tr;
  }));
  if (!listed.length) noneRow($('#venues-table tbody'), 'venues.none');
  $('#venue-form').hidden = !mayDo('municipal_admin');
}

async function recordStock(event) {
  event.preventDefault();
  const body = {
    kind: $('#stock-kind').value,
    venue: $('#stock-venue').value.trim(),
    product: $('#stock-product').value,
    doses: Number($('#stock-doses').value),
  };
  const reason = $('#stock-reason').value.trim();
  if (reason) body.reason = reason;
  try {
    await api('POST', '/api/v1/stock/entries', body);
    $('#stock-doses').value = '';
    $('#stock-reason').value = '';
    await showStock();
    say(t('stock.recorded'), true);
  } catch (error) {
    say(error.message);
  }
}

async function addLot(event) {
  event.preventDefault();
  const body = { lot: $('#lot-number').value.trim(), gtin: $('#lot-product').value, expiry: $('#lot-expiry').value };
  try {
    await api('POST', '/api/v1/lots', body);
    $('#lot-number').value = '';
    await showStock();
    say(`${t('lots.added')}${colon()}${body.lot}`, true);
  } catch (error) {
    say(error.message);
  }
}

function editVenue(record) {
  const v = record.venue;
  $('#venue-id').value = v.id;
  $('#venue-name').value = v.name;
  $('#venue-address').value = v.address;
  $('#venue-note').value = v.note || '';
  $('#venue-listed').checked = record.listed;
  for (const box of document.querySelectorAll('#venue-products input')) box.checked = (v.products || []).includes(box.value);
  const days = v.opening_days || [];
  for (const box of document.querySelectorAll('#venue-weekdays input')) box.checked = days.includes(box.value);
  $('#venue-dates').value = days.filter((d) => !WEEKDAYS.includes(d)).join(', ');
  $('#venue-name').focus();
}

async function saveVenue(event) {
  event.preventDefault();
  const id = $('#venue-id').value.trim();
  const dates = $('#venue-dates').value.split(/[,、\s]+/).map((d) => d.trim()).filter(Boolean);
  const body = {
    name: $('#venue-name').value.trim(),
    address: $('#venue-address').value.trim(),
    products: [...document.querySelectorAll('#venue-products input:checked')].map((box) => box.value),
    opening_days: [...[...document.querySelectorAll('#venue-weekdays input:checked')].map((box) => box.value), ...dates],
    note: $('#venue-note').value.trim(),
    listed: $('#venue-listed').checked,
  };
  try {
    await api('POST', `/api/v1/venues/${encodeURIComponent(id)}`, body);
    $('#venue-form').reset();
    await showStock();
    say(`${t('venues.saved')}${colon()}${id}`, true);
  } catch (error) {
    say(error.message);
  }
}

// ---- users, tokens and terminals -----------------------------------------------------

function venuesList(text) {
  return text.split(/[,、\s]+/).map((v) => v.trim()).filter(Boolean);
}

/** Forgets a secret shown once (leaving the page, or logging out). */
function hideSecret() {
  $('#secret-box').hidden = true;
  $('#secret-value').textContent = '';
  $('#secret-hint').textContent = '';
}

/** Shows a secret the node gives only once, and for a terminal the command that uses it. */
function showSecret(secret, command) {
  $('#secret-value').textContent = secret;
  $('#secret-hint').textContent = command || '';
  $('#secret-hint').hidden = $('#secret-hint-label').hidden = !command;
  $('#secret-box').hidden = false;
}

async function showAdmin() {
  show('admin');
  for (const select of document.querySelectorAll('select.roles')) {
    const chosen = select.value;
    select.replaceChildren(...ROLES.map((r) => el('option', label('role', r), { value: r })));
    if (chosen) select.value = chosen;
  }
  // A venue terminal keeps its own accounts but enrols no terminals.
  const onTerminal = me.node === 'terminal';
  $('#terminals-part').hidden = onTerminal;
  const [{ data: users }, { data: tokens }, { data: terminals }] = await Promise.all([
    api('GET', '/api/v1/users'), api('GET', '/api/v1/tokens'),
    onTerminal ? { data: { terminals: [], enrolments: [] } } : api('GET', '/api/v1/terminals'),
  ]);
  const now = new Date();
  $('#users-table tbody').replaceChildren(...users.users.map((u) => {
    const locked = u.locked_until && new Date(u.locked_until) > now;
    let state = u.disabled ? t('users.disabled') : t('users.active');
    if (locked) state = `${t('users.locked')} ${localDate(u.locked_until)}`;
    const actions = document.createElement('span');
    // An administrator does not lock themselves out from here.
    if (me.actor !== `user:${u.username}`) {
      actions.append(u.disabled ? button('users.enable', () => setDisabled(u, false), 'enable') : button('users.disable', () => setDisabled(u, true), 'disable'), ' ');
    }
    actions.append(button('users.reset', () => resetPassword(u), 'reset-password'));
    const tr = row([u.username, label('role', u.role), joined(u.venues), localDate(u.created_at), state, actions]);
    tr.dataset.user = u.username;
    if (u.disabled) tr.classList.add('voided');
    return tr;
  }));
  if (!users.users.length) noneRow($('#users-table tbody'));
  $('#tokens-table tbody').replaceChildren(...tokens.tokens.map((k) => {
    const expired = k.expires_at && new Date(k.expires_at) <= now;
    const state = k.revoked ? t('tokens.revoked') : expired ? t('tokens.expired') : t('users.active');
    const action = k.revoked ? '' : button('tokens.revoke', () => revokeToken(k), 'revoke-token');
    const tr = row([k.name, label('role', k.role), joined(k.venues), localDate(k.created_at),
      k.expires_at ? localDate(k.expires_at) : t('tokens.never'), state, action]);
    tr.dataset.token = k.name;
    if (k.revoked || expired) tr.classList.add('voided');
    return tr;
  }));
  $('#terminals-table tbody').replaceChildren(...terminals.terminals.map((m) => {
    const c = m.certificate;
    const action = m.revoked ? '' : button('terminals.revoke', () => revokeTerminal(c.peer_id), 'revoke-terminal');
    const tr = row([c.peer_id, c.venue, localDate(c.issued_at), m.revoked ? t('terminals.revoked') : t('terminals.active'), action]);
    tr.dataset.peer = c.peer_id;
    if (m.revoked) tr.classList.add('voided');
    return tr;
  }));
  if (!terminals.terminals.length) noneRow($('#terminals-table tbody'));
  $('#enrolments-table tbody').replaceChildren(...terminals.enrolments.map((e) =>
    row([e.venue, localDate(e.expires_at), e.used_by || t('terminals.unused'), e.created_by])));
  if (!terminals.enrolments.length) noneRow($('#enrolments-table tbody'));
}

async function addUser(event) {
  event.preventDefault();
  const body = {
    username: $('#user-name').value.trim(),
    role: $('#user-role').value,
    password: $('#user-password').value,
    venues: venuesList($('#user-venues').value),
  };
  try {
    await api('POST', '/api/v1/users', body);
    $('#user-form').reset();
    await showAdmin();
    say(`${t('users.added')}${colon()}${body.username}`, true);
  } catch (error) {
    $('#user-password').value = '';
    say(error.message);
  }
}

async function setDisabled(user, disabled) {
  if (disabled && !window.confirm(t('confirm.disable'))) return;
  try {
    await api('POST', `/api/v1/users/${encodeURIComponent(user.username)}/disable`, { disabled });
    await showAdmin();
    say(`${t(disabled ? 'users.done.disable' : 'users.done.enable')}${colon()}${user.username}`, true);
  } catch (error) {
    say(error.message);
  }
}

async function resetPassword(user) {
  const answer = await askReason('dialog.password', 'password');
  if (!answer) return;
  try {
    await api('POST', `/api/v1/users/${encodeURIComponent(user.username)}/reset-password`, { password: answer.password });
    await showAdmin();
    say(`${t('users.done.reset')}${colon()}${user.username}`, true);
  } catch (error) {
    say(error.message);
  }
}

async function addToken(event) {
  event.preventDefault();
  const body = { name: $('#token-name').value.trim(), role: $('#token-role').value, venues: venuesList($('#token-venues').value) };
  const days = $('#token-days').value;
  if (days) body.expires_days = Number(days);
  try {
    const { data } = await api('POST', '/api/v1/tokens', body);
    $('#token-form').reset();
    showSecret(data.token);
    await showAdmin();
    say(`${t('tokens.added')}${colon()}${body.name}`, true);
  } catch (error) {
    say(error.message);
  }
}

async function revokeToken(token) {
  if (!window.confirm(t('confirm.revokeToken'))) return;
  try {
    await api('POST', `/api/v1/tokens/${encodeURIComponent(token.name)}/revoke`);
    await showAdmin();
    say(`${t('tokens.done.revoke')}${colon()}${token.name}`, true);
  } catch (error) {
    say(error.message);
  }
}

async function enrolTerminal(event) {
  event.preventDefault();
  const body = { venue: $('#enrol-venue').value.trim() };
  const hours = $('#enrol-hours').value;
  if (hours) body.valid_hours = Number(hours);
  try {
    const { data } = await api('POST', '/api/v1/terminals/enrolments', body);
    $('#enrol-form').reset();
    const command = `vrs-node init --role terminal --municipality ${me.municipality} --data /var/lib/vrs-terminal --plain-http --listen 127.0.0.1:8080 --enroll '${data.token}'`;
    showSecret(data.token, command);
    await showAdmin();
    say(`${t('terminals.enrolled')}${colon()}${data.venue}`, true);
  } catch (error) {
    say(error.message);
  }
}

async function revokeTerminal(peer) {
  if (!window.confirm(t('confirm.revokeTerminal'))) return;
  try {
    await api('POST', `/api/v1/terminals/${encodeURIComponent(peer)}/revoke`);
    await showAdmin();
    say(t('terminals.done.revoke'), true);
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
  $('#print-go').addEventListener('click', () => window.print());
  $('#terminal-refresh').addEventListener('click', () => showTerminal().catch((error) => say(error.message)));
  $('#print-close').addEventListener('click', closePrint);
  $('#print-dialog').addEventListener('close', closePrint);
  nameAsTyped($('#move-to'), $('#move-to-name'));
  nameAsTyped($('#ask-previous'), $('#ask-previous-name'));
  $('#stock-form').addEventListener('submit', recordStock);
  $('#lot-form').addEventListener('submit', addLot);
  $('#venue-form').addEventListener('submit', saveVenue);
  $('#user-form').addEventListener('submit', addUser);
  $('#token-form').addEventListener('submit', addToken);
  $('#enrol-form').addEventListener('submit', enrolTerminal);
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
