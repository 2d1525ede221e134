#include "engine/tls.h"

#include <arpa/inet.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <system_error>
#include <thread>
#include <utility>

#include "engine/session.h"

namespace dstx::engine {
namespace {

using Clock = std::chrono::steady_clock;
using wire::Reason;

// kTLS (Linux) protects TLS 1.3 records with these three suites; nothing else is offered, so a session can
// always be handed to the kernel. AES-128-GCM first: the fastest where AES-NI is present.
constexpr const char* kSuites = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
constexpr uint16_t kSuiteAes128 = 0x1301;
constexpr uint16_t kSuiteAes256 = 0x1302;
constexpr uint16_t kSuiteChacha = 0x1303;
constexpr unsigned char kPskSuite[2] = {0x13, 0x01};  // an external PSK is bound to a hash: SHA-256's suite

constexpr size_t kRelayBuffer = 256 << 10;             // per direction and stream
constexpr auto kRelayFlush = std::chrono::seconds(5);  // at teardown, for what the engine wrote last

struct CtxFree {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL* s) const { SSL_free(s); }
};
using CtxPtr = std::unique_ptr<SSL_CTX, CtxFree>;
using SslPtr = std::unique_ptr<SSL, SslFree>;

std::string errno_string(int err) {
  return std::strerror(err < 0 ? -err : err);
}

// This thread's OpenSSL error queue, taken (the queue is left empty).
struct Errors {
  std::vector<unsigned long> codes;
  static Errors take() {
    Errors out;
    while (const unsigned long e = ERR_get_error()) out.codes.push_back(e);
    return out;
  }
  bool has(int reason) const {
    return std::any_of(codes.begin(), codes.end(), [&](unsigned long e) {
      return ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == reason;
    });
  }
  // The TLS alert the peer sent, if any (OpenSSL files it as reason 1000 + alert); else -1.
  int alert() const {
    for (unsigned long e : codes) {
      const int r = ERR_GET_REASON(e);
      if (ERR_GET_LIB(e) == ERR_LIB_SSL && r >= SSL_AD_REASON_OFFSET && r < SSL_AD_REASON_OFFSET + 256)
        return r - SSL_AD_REASON_OFFSET;
    }
    return -1;
  }
  std::string text() const {
    std::string out;
    for (unsigned long e : codes) {
      const char* r = ERR_reason_error_string(e);
      const std::string one = r ? r : "error " + std::to_string(ERR_GET_REASON(e));
      if (out.find(one) != std::string::npos) continue;
      out += (out.empty() ? "" : "; ") + one;
    }
    return out;
  }
};

std::string openssl_errors() {
  return Errors::take().text();
}

bool is_ip_address(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

// Text a peer chose (its certificate's names, its PSK identity), made safe to print and to send on as an
// ABORTED reason: printable ASCII only, at most `max` bytes.
std::string printable(std::string text, size_t max) {
  if (text.size() > max) text.resize(max);
  for (char& ch : text) {
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) ch = '?';
  }
  return text;
}

// "CN=x, DNS:a, IP:1.2.3.4": who a certificate says it is (printable: the peer chose it).
std::string describe_cert(X509* cert) {
  if (!cert) return "(no certificate)";
  std::string out;
  char cn[256];
  if (X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn) > 0) {
    out = std::string("CN=") + cn;
  }
  auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  std::string sans;
  for (int i = 0; names && i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    std::string one;
    if (n->type == GEN_DNS) {
      const ASN1_STRING* s = n->d.dNSName;
      one = "DNS:" + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                 size_t(ASN1_STRING_length(s)));
    } else if (n->type == GEN_IPADD) {
      const ASN1_OCTET_STRING* s = n->d.iPAddress;
      char buf[INET6_ADDRSTRLEN] = "?";
      if (ASN1_STRING_length(s) == 4) inet_ntop(AF_INET, ASN1_STRING_get0_data(s), buf, sizeof buf);
      if (ASN1_STRING_length(s) == 16) inet_ntop(AF_INET6, ASN1_STRING_get0_data(s), buf, sizeof buf);
      one = std::string("IP:") + buf;
    }
    if (one.empty()) continue;
    sans += (sans.empty() ? "" : ", ") + one;
  }
  GENERAL_NAMES_free(names);
  if (!sans.empty())
    out += (out.empty() ? "" : ", ") + sans;
  else
    out += (out.empty() ? "" : ", ") + std::string("no subjectAltName");
  return printable(std::move(out), 256);
}

std::string asn1_time_text(const ASN1_TIME* t) {
  BIO* b = BIO_new(BIO_s_mem());
  if (!b) return "?";
  ASN1_TIME_print(b, t);
  char* data = nullptr;
  const long n = BIO_get_mem_data(b, &data);
  std::string out(data, size_t(std::max(0L, n)));
  BIO_free(b);
  return out;
}

// ---- configuration ----------------------------------------------------------------------------------------

struct Psk {
  std::string identity;
  std::vector<unsigned char> key;
  ~Psk() { OPENSSL_cleanse(key.data(), key.size()); }
};

std::string read_small_file(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return "cannot open '" + path + "': " + errno_string(errno);
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  if (out->size() > 4096) return "'" + path + "' is larger than 4 KiB: not a PSK file";
  return {};
}

std::string load_psk(const std::string& path, Psk* psk) {
  std::string text;
  if (std::string err = read_small_file(path, &text); !err.empty()) return "PSK file: " + err;
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.erase(0, 1);
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    OPENSSL_cleanse(text.data(), text.size());
    return "PSK file '" + path + "': expected one line IDENTITY:HEXKEY";
  }
  psk->identity = text.substr(0, colon);
  const std::string hex = text.substr(colon + 1);
  OPENSSL_cleanse(text.data(), text.size());
  if (psk->identity.size() > 128) return "PSK file '" + path + "': the identity is longer than 128 bytes";
  if (hex.size() % 2 != 0 || hex.size() < 32 || hex.size() > 128 ||
      !std::all_of(hex.begin(), hex.end(),
                   [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); })) {
    return "PSK file '" + path + "': the key must be 32 to 128 hex digits (16 to 64 bytes)";
  }
  psk->key.resize(hex.size() / 2);
  for (size_t i = 0; i < psk->key.size(); ++i)
    psk->key[i] = uint8_t(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return {};
}

std::string check_readable(const char* what, const std::string& path) {
  if (::access(path.c_str(), R_OK) != 0) return std::string(what) + " '" + path + "': " + errno_string(errno);
  return {};
}

struct Config;

// Per connection: what the callbacks learn while OpenSSL runs the handshake.
struct Conn {
  Config* config = nullptr;
  SslPtr ssl;
  int fd = -1;
  unsigned char first[8] = {};  // the first bytes the peer sent (a plaintext dstx frame starts "DSXF")
  size_t first_len = 0;
  bool eof = false;
  // The traffic secrets (from the keylog callback), for kTLS.
  std::vector<uint8_t> client_secret, server_secret;
  // The first certificate check that failed.
  bool verify_failed = false;
  int verify_error = X509_V_OK;
  int verify_depth = 0;
  std::string verify_cert;
  std::string verify_not_after;
  // PSK (server): what the client offered.
  bool psk_offered = false;
  std::string psk_unknown_identity;

  ~Conn() {
    OPENSSL_cleanse(client_secret.data(), client_secret.size());
    OPENSSL_cleanse(server_secret.data(), server_secret.size());
  }
};

struct Config {
  CtxPtr ctx;
  TlsRole role = TlsRole::client;
  bool psk_mode = false;
  Psk psk;
  std::string peer_name;
};

Conn* conn_of(const SSL* ssl) {
  return static_cast<Conn*>(SSL_get_app_data(ssl));
}

// A socket BIO that never raises SIGPIPE (MSG_NOSIGNAL), never blocks (MSG_DONTWAIT: the caller polls), and
// keeps the peer's first bytes for the error text.
int bio_write(BIO* b, const char* data, int len) {
  auto* c = static_cast<Conn*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  ssize_t n;
  do n = ::send(c->fd, data, size_t(len), MSG_NOSIGNAL | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) BIO_set_retry_write(b);
  return int(n);
}

int bio_read(BIO* b, char* out, int len) {
  auto* c = static_cast<Conn*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  ssize_t n;
  do n = ::recv(c->fd, out, size_t(len), MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) BIO_set_retry_read(b);
  if (n == 0) c->eof = true;
  if (n > 0 && c->first_len < sizeof c->first) {
    const size_t k = std::min(sizeof c->first - c->first_len, size_t(n));
    std::memcpy(c->first + c->first_len, out, k);
    c->first_len += k;
  }
  return int(n);
}

long bio_ctrl(BIO*, int cmd, long, void*) {
  return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

int bio_create(BIO* b) {
  BIO_set_init(b, 1);
  return 1;
}

int bio_destroy(BIO*) {
  return 1;
}

BIO_METHOD* bio_method() {
  static BIO_METHOD* m = [] {
    BIO_METHOD* mm = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "dstx socket");
    BIO_meth_set_write(mm, bio_write);
    BIO_meth_set_read(mm, bio_read);
    BIO_meth_set_ctrl(mm, bio_ctrl);
    BIO_meth_set_create(mm, bio_create);
    BIO_meth_set_destroy(mm, bio_destroy);
    return mm;
  }();
  return m;
}

void keylog(const SSL* ssl, const char* line) {
  Conn* c = conn_of(ssl);
  if (!c) return;
  std::string_view l(line);
  std::vector<uint8_t>* dst = nullptr;
  if (l.rfind("CLIENT_TRAFFIC_SECRET_0 ", 0) == 0) dst = &c->client_secret;
  if (l.rfind("SERVER_TRAFFIC_SECRET_0 ", 0) == 0) dst = &c->server_secret;
  if (!dst) return;
  const size_t sp = l.rfind(' ');
  const std::string_view hex = l.substr(sp + 1);
  dst->resize(hex.size() / 2);
  for (size_t i = 0; i < dst->size(); ++i) {
    auto nib = [](char ch) {
      return uint8_t(std::isdigit(static_cast<unsigned char>(ch)) ? ch - '0' : (ch | 0x20) - 'a' + 10);
    };
    (*dst)[i] = uint8_t(nib(hex[2 * i]) << 4 | nib(hex[2 * i + 1]));
  }
}

int verify_cb(int ok, X509_STORE_CTX* store) {
  if (ok) return ok;
  auto* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  Conn* c = ssl ? conn_of(ssl) : nullptr;
  if (c && !c->verify_failed) {
    c->verify_failed = true;
    c->verify_error = X509_STORE_CTX_get_error(store);
    c->verify_depth = X509_STORE_CTX_get_error_depth(store);
    X509* cert = X509_STORE_CTX_get_current_cert(store);
    c->verify_cert = describe_cert(cert);
    if (cert) c->verify_not_after = asn1_time_text(X509_get0_notAfter(cert));
  }
  return ok;
}

SSL_SESSION* psk_session(SSL* ssl, const Psk& psk) {
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kPskSuite);
  if (!cipher) return nullptr;
  SSL_SESSION* s = SSL_SESSION_new();
  if (!s) return nullptr;
  if (!SSL_SESSION_set1_master_key(s, psk.key.data(), psk.key.size()) || !SSL_SESSION_set_cipher(s, cipher) ||
      !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
    SSL_SESSION_free(s);
    return nullptr;
  }
  return s;
}

int psk_use_session(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* id_len,
                    SSL_SESSION** sess) {
  Conn* c = conn_of(ssl);
  *sess = nullptr;
  *id = nullptr;
  *id_len = 0;
  if (!c) return 0;
  SSL_SESSION* s = psk_session(ssl, c->config->psk);
  if (!s) return 0;
  if (md && SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(s)) != md) {
    SSL_SESSION_free(s);  // after a HelloRetryRequest for another hash: offer nothing
    return 1;
  }
  *sess = s;
  *id = reinterpret_cast<const unsigned char*>(c->config->psk.identity.data());
  *id_len = c->config->psk.identity.size();
  return 1;
}

int psk_find_session(SSL* ssl, const unsigned char* id, size_t id_len, SSL_SESSION** sess) {
  Conn* c = conn_of(ssl);
  *sess = nullptr;
  if (!c) return 0;
  c->psk_offered = true;
  const std::string offered(reinterpret_cast<const char*>(id), id_len);
  if (offered != c->config->psk.identity) {
    c->psk_unknown_identity = offered;
    return 1;  // no PSK: the handshake then fails (no certificate to fall back on)
  }
  *sess = psk_session(ssl, c->config->psk);
  return *sess ? 1 : 0;
}

std::unique_ptr<Config> build_config(const TlsOptions& o, TlsRole role, std::string* err) {
  if (std::string e = check_tls_options(o); !e.empty()) {
    *err = e;
    return nullptr;
  }
  auto cfg = std::make_unique<Config>();
  cfg->role = role;
  cfg->psk_mode = !o.psk_file.empty();
  cfg->peer_name = o.peer_name;
  ERR_clear_error();
  cfg->ctx.reset(SSL_CTX_new(role == TlsRole::client ? TLS_client_method() : TLS_server_method()));
  SSL_CTX* ctx = cfg->ctx.get();
  if (!ctx) {
    *err = "SSL_CTX_new: " + openssl_errors();
    return nullptr;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  if (!SSL_CTX_set_ciphersuites(ctx, kSuites)) {
    *err = "TLS cipher suites: " + openssl_errors();
    return nullptr;
  }
  // No session tickets: nothing but application data follows the handshake, so a kTLS receive path never
  // meets a post-handshake record (which a plain recv() would fail with EIO). No resumption either.
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_keylog_callback(ctx, keylog);
  if (cfg->psk_mode) {
    if (std::string e = load_psk(o.psk_file, &cfg->psk); !e.empty()) {
      *err = e;
      return nullptr;
    }
    if (role == TlsRole::client) {
      SSL_CTX_set_psk_use_session_callback(ctx, psk_use_session);
      // With no CA loaded, a receiver that answers with a certificate instead of our key fails here.
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, verify_cb);
    } else {
      SSL_CTX_set_psk_find_session_callback(ctx, psk_find_session);
    }
    return cfg;
  }
  for (auto [what, path] :
       {std::pair{"TLS CA file", &o.ca_file}, std::pair{"TLS certificate file", &o.cert_file},
        std::pair{"TLS key file", &o.key_file}}) {
    if (std::string e = check_readable(what, *path); !e.empty()) {
      *err = e;
      return nullptr;
    }
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, o.cert_file.c_str()) != 1) {
    *err = "TLS certificate file '" + o.cert_file + "': " + openssl_errors();
    return nullptr;
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, o.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    const std::string why = openssl_errors();
    *err =
        why.find("key values mismatch") != std::string::npos
            ? "TLS key file '" + o.key_file + "' does not belong to the certificate in '" + o.cert_file + "'"
            : "TLS key file '" + o.key_file + "': " + why;
    return nullptr;
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    *err = "TLS key file '" + o.key_file + "' does not belong to the certificate in '" + o.cert_file +
           "': " + openssl_errors();
    return nullptr;
  }
  if (SSL_CTX_load_verify_locations(ctx, o.ca_file.c_str(), nullptr) != 1) {
    *err = "TLS CA file '" + o.ca_file + "': " + openssl_errors();
    return nullptr;
  }
  SSL_CTX_set_verify(
      ctx, role == TlsRole::server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_PEER,
      verify_cb);
  return cfg;
}

// ---- descriptions of failures -----------------------------------------------------------------------------

std::string alert_hint(int alert, bool psk_mode) {
  switch (alert) {
    case SSL_AD_UNKNOWN_CA:
      return "the peer does not trust the CA that issued our certificate";
    case SSL_AD_BAD_CERTIFICATE:
    case SSL_AD_UNSUPPORTED_CERTIFICATE:
      return "the peer rejected our certificate (wrong name for its --tls-peer-name, or unusable)";
    case SSL_AD_CERTIFICATE_EXPIRED:
      return "the peer says our certificate has expired";
    case SSL_AD_CERTIFICATE_REQUIRED:
      return "the peer requires a certificate from us";
    case SSL_AD_DECRYPT_ERROR:
      return psk_mode ? "the peer's pre-shared key differs from ours"
                      : "a handshake signature did not verify";
    case SSL_AD_HANDSHAKE_FAILURE:
      return psk_mode ? "no common authentication: the peer refused our pre-shared key or uses certificates"
                      : "no common authentication (does the peer use a pre-shared key?) or our certificate "
                        "does not carry the name the peer expects";
    case SSL_AD_ILLEGAL_PARAMETER:
      return psk_mode ? "the peer's pre-shared key differs from ours (its PSK binder check failed)" : "";
    case SSL_AD_UNKNOWN_PSK_IDENTITY:
      return "the peer does not know our pre-shared key identity";
    case SSL_AD_PROTOCOL_VERSION:
      return "the peer does not speak TLS 1.3";
    default:
      return {};
  }
}

// After SSL_connect/SSL_accept/SSL_read/SSL_write failed with `ssl_err`: why, in words. Consumes the queue.
std::string ssl_failure(Conn& c, int ssl_err, bool handshake) {
  const bool psk = c.config->psk_mode;
  if (c.verify_failed) {
    std::string s = "the peer's certificate (" + c.verify_cert +
                    (c.verify_depth > 0 ? ", in its chain" : "") +
                    ") was rejected: " + X509_verify_cert_error_string(c.verify_error);
    switch (c.verify_error) {
      case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
      case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
      case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
      case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
      case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
        s += psk ? " (the receiver authenticates with a certificate; we expect a pre-shared key)"
                 : " (not issued by the CA we trust)";
        break;
      case X509_V_ERR_CERT_HAS_EXPIRED:
        s += " (not after " + c.verify_not_after + ")";
        break;
      case X509_V_ERR_HOSTNAME_MISMATCH:
      case X509_V_ERR_IP_ADDRESS_MISMATCH:
        s += " (expected peer name '" + c.config->peer_name + "' in its subjectAltName)";
        break;
      default:
        break;
    }
    ERR_clear_error();
    return s;
  }
  if (!c.psk_unknown_identity.empty()) {
    ERR_clear_error();
    return "the peer's pre-shared key identity '" + printable(c.psk_unknown_identity, 64) +
           "' is not ours ('" + c.config->psk.identity + "')";
  }
  if (c.first_len >= 4 && std::memcmp(c.first, "DSXF", 4) == 0) {
    ERR_clear_error();
    return "the peer does not use TLS: it answered with a plaintext dstx frame (start it with "
           "--tls-ca/--tls-cert/--tls-key or --psk-file)";
  }
  if (handshake && c.config->role == TlsRole::server && psk && !c.psk_offered && c.first_len > 0 &&
      c.first[0] == 0x16) {
    ERR_clear_error();
    return "the peer offered no pre-shared key (does it use certificates?)";
  }
  const int saved_errno = errno;
  const Errors errors = Errors::take();
  const int alert = errors.alert();
  const bool binder = errors.has(SSL_R_BINDER_DOES_NOT_VERIFY);
  const bool eof_mid_record = errors.has(SSL_R_UNEXPECTED_EOF_WHILE_READING);
  const std::string queue = errors.text();
  if (binder) return "the peer's pre-shared key differs from ours (PSK binder does not verify)";
  if (alert >= 0) {
    std::string s = std::string("the peer sent TLS alert '") + SSL_alert_desc_string_long(alert) + "'";
    if (const std::string hint = alert_hint(alert, psk); !hint.empty()) s += ": " + hint;
    return s;
  }
  if (eof_mid_record || (ssl_err == SSL_ERROR_SYSCALL && queue.empty() && c.eof)) {
    if (handshake && c.first_len == 0)
      return "the peer closed the connection before answering the TLS handshake";
    return handshake        ? "the peer closed the connection during the TLS handshake"
           : eof_mid_record ? "the peer closed the connection in the middle of a TLS record"
                            : "the peer closed the connection";
  }
  if (ssl_err == SSL_ERROR_SYSCALL) {
    return queue.empty() ? (saved_errno ? errno_string(saved_errno) : std::string("connection failed"))
                         : queue;
  }
  if (handshake && c.first_len > 0 && c.first[0] != 0x16 && c.first[0] != 0x15) {
    return "the peer does not speak TLS (" + (queue.empty() ? std::string("not a TLS record") : queue) + ")";
  }
  return queue.empty() ? "TLS error " + std::to_string(ssl_err) : queue;
}

// ---- handshake --------------------------------------------------------------------------------------------

// Waits for `events` on fd until the deadline. 1 ready, 0 time-out, -errno.
int wait_fd(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return 0;
    pollfd p{.fd = fd, .events = events, .revents = 0};
    const int r = ::poll(&p, 1, int(std::min<int64_t>(left, 1000)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -errno;
    if (r > 0) return 1;
  }
}

struct HandshakeResult {
  HandshakeError error;
  bool generic = false;  // a mere closed/reset connection: another stream's error may say more
};

// `give_up`, checked every 100 ms while waiting: another stream already failed the transfer.
HandshakeResult handshake(Config& cfg, Conn& c, int timeout_ms, const std::function<bool()>& give_up = {}) {
  HandshakeResult out;
  ERR_clear_error();
  c.ssl.reset(SSL_new(cfg.ctx.get()));
  BIO* bio = c.ssl ? BIO_new(bio_method()) : nullptr;
  if (!bio) {
    out.error = {Reason::internal, "TLS set-up: " + openssl_errors()};
    return out;
  }
  BIO_set_data(bio, &c);
  SSL_set_bio(c.ssl.get(), bio, bio);
  SSL_set_app_data(c.ssl.get(), &c);
  SSL* ssl = c.ssl.get();
  if (!cfg.psk_mode && !cfg.peer_name.empty()) {
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
    const int ok = is_ip_address(cfg.peer_name)
                       ? X509_VERIFY_PARAM_set1_ip_asc(param, cfg.peer_name.c_str())
                       : X509_VERIFY_PARAM_set1_host(param, cfg.peer_name.c_str(), 0);
    if (ok != 1) {
      out.error = {Reason::internal, "TLS peer name '" + cfg.peer_name + "': " + openssl_errors()};
      return out;
    }
  }
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 86400000 : timeout_ms);
  for (;;) {
    ERR_clear_error();
    const int rc = cfg.role == TlsRole::client ? SSL_connect(ssl) : SSL_accept(ssl);
    if (rc == 1) break;
    const int e = SSL_get_error(ssl, rc);
    short events = 0;
    if (e == SSL_ERROR_WANT_READ) events = POLLIN;
    if (e == SSL_ERROR_WANT_WRITE) events = POLLOUT;
    if (events == 0) {
      out.error = {Reason::protocol, "TLS handshake failed: " + ssl_failure(c, e, true)};
      out.generic =
          e == SSL_ERROR_SYSCALL || out.error.text.find("closed the connection") != std::string::npos;
      return out;
    }
    int w = 0;
    while (Clock::now() < deadline) {
      w = wait_fd(c.fd, events, std::min(deadline, Clock::now() + std::chrono::milliseconds(100)));
      if (w != 0 || (give_up && give_up())) break;
    }
    if (w == 0) {
      out.error = {Reason::timeout,
                   give_up && give_up() ? "TLS handshake abandoned: another stream failed or the receiver refused"
                                        : "TLS handshake did not complete within " + std::to_string(timeout_ms) +
                                              " ms"};
      out.generic = true;
      return out;
    }
    if (w < 0) {
      out.error = {Reason::connection, "TLS handshake: poll: " + errno_string(w)};
      return out;
    }
  }
  // A pre-shared key must have been used: an unauthenticated handshake never passes.
  if (cfg.psk_mode && !SSL_session_reused(ssl)) {
    out.error = {Reason::protocol, "TLS handshake failed: the peer did not use our pre-shared key"};
    return out;
  }
  if (!cfg.psk_mode && !SSL_get0_peer_certificate(ssl)) {
    out.error = {Reason::protocol, "TLS handshake failed: the peer presented no certificate"};
    return out;
  }
  return out;
}

// ---- kTLS -------------------------------------------------------------------------------------------------

bool suite_params(uint16_t suite, const char** digest, size_t* key_len) {
  switch (suite) {
    case kSuiteAes128:
      *digest = "SHA256";
      *key_len = 16;
      return true;
    case kSuiteAes256:
      *digest = "SHA384";
      *key_len = 32;
      return true;
    case kSuiteChacha:
      *digest = "SHA256";
      *key_len = 32;
      return true;
    default:
      return false;
  }
}

// HKDF-Expand-Label(secret, label, "", len) of RFC 8446 7.1.
bool expand_label(const char* digest, const std::vector<uint8_t>& secret, const std::string& label,
                  size_t len, std::vector<uint8_t>* out) {
  std::vector<uint8_t> info;
  const std::string full = "tls13 " + label;
  info.push_back(uint8_t(len >> 8));
  info.push_back(uint8_t(len));
  info.push_back(uint8_t(full.size()));
  info.insert(info.end(), full.begin(), full.end());
  info.push_back(0);  // empty context
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  if (!kdf) return false;
  EVP_KDF_CTX* kctx = EVP_KDF_CTX_new(kdf);
  EVP_KDF_free(kdf);
  if (!kctx) return false;
  int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode),
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, const_cast<char*>(digest), 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<uint8_t*>(secret.data()),
                                        secret.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info.data(), info.size()),
      OSSL_PARAM_construct_end()};
  out->assign(len, 0);
  const bool ok = EVP_KDF_derive(kctx, out->data(), len, params) == 1;
  EVP_KDF_CTX_free(kctx);
  return ok;
}

union CryptoInfo {
  tls12_crypto_info_aes_gcm_128 aes128;
  tls12_crypto_info_aes_gcm_256 aes256;
  tls12_crypto_info_chacha20_poly1305 chacha;
};

// Fills the kernel's record-protection parameters for one direction, sequence number 0 (the first record
// under the application traffic keys). Returns the struct size, 0 on failure.
size_t crypto_info(uint16_t suite, const std::vector<uint8_t>& secret, CryptoInfo* info) {
  std::vector<uint8_t> key, iv;
  if (!tls_detail::traffic_keys(suite, secret, &key, &iv)) return 0;
  std::memset(info, 0, sizeof *info);
  size_t size = 0;
  switch (suite) {
    case kSuiteAes128: {
      auto& i = info->aes128;
      i.info.version = TLS_1_3_VERSION;
      i.info.cipher_type = TLS_CIPHER_AES_GCM_128;
      std::memcpy(i.key, key.data(), sizeof i.key);
      std::memcpy(i.salt, iv.data(), sizeof i.salt);
      std::memcpy(i.iv, iv.data() + sizeof i.salt, sizeof i.iv);
      size = sizeof i;
      break;
    }
    case kSuiteAes256: {
      auto& i = info->aes256;
      i.info.version = TLS_1_3_VERSION;
      i.info.cipher_type = TLS_CIPHER_AES_GCM_256;
      std::memcpy(i.key, key.data(), sizeof i.key);
      std::memcpy(i.salt, iv.data(), sizeof i.salt);
      std::memcpy(i.iv, iv.data() + sizeof i.salt, sizeof i.iv);
      size = sizeof i;
      break;
    }
    case kSuiteChacha: {
      auto& i = info->chacha;
      i.info.version = TLS_1_3_VERSION;
      i.info.cipher_type = TLS_CIPHER_CHACHA20_POLY1305;
      std::memcpy(i.key, key.data(), sizeof i.key);
      std::memcpy(i.iv, iv.data(), sizeof i.iv);
      size = sizeof i;
      break;
    }
    default:
      break;
  }
  OPENSSL_cleanse(key.data(), key.size());
  OPENSSL_cleanse(iv.data(), iv.size());
  return size;
}

std::string ulp_error_text(int err) {
  std::string s = "TCP_ULP \"tls\": " + errno_string(err);
  if (err == ENOENT)
    s += " (no TLS offload in this kernel: built without CONFIG_TLS, or the tls module is not loaded: "
         "modprobe tls)";
  return s;
}

struct KtlsOutcome {
  bool enabled = false;
  bool fatal = false;  // the socket is half configured: neither kTLS nor user-space TLS can use it
  std::string why;     // when not enabled
};

KtlsOutcome enable_ktls(Conn& c) {
  KtlsOutcome out;
  SSL* ssl = c.ssl.get();
  int proto = 0;
  socklen_t len = sizeof proto;
  if (::getsockopt(c.fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) != 0 || proto != IPPROTO_TCP) {
    out.why = "not a TCP socket";
    return out;
  }
  if (SSL_has_pending(ssl)) {
    out.why = "OpenSSL holds bytes received after the handshake";
    return out;
  }
  const uint16_t suite = SSL_CIPHER_get_protocol_id(SSL_get_current_cipher(ssl));
  const bool client = c.config->role == TlsRole::client;
  const std::vector<uint8_t>& tx_secret = client ? c.client_secret : c.server_secret;
  const std::vector<uint8_t>& rx_secret = client ? c.server_secret : c.client_secret;
  if (tx_secret.empty() || rx_secret.empty()) {
    out.why = "the traffic secrets were not captured";
    return out;
  }
  CryptoInfo tx, rx;
  const size_t tx_size = crypto_info(suite, tx_secret, &tx);
  const size_t rx_size = crypto_info(suite, rx_secret, &rx);
  if (tx_size == 0 || rx_size == 0) {
    OPENSSL_cleanse(&tx, sizeof tx);
    OPENSSL_cleanse(&rx, sizeof rx);
    out.why = "cipher suite " + std::to_string(suite) + " has no kernel offload";
    return out;
  }
  auto wipe = [&] {
    OPENSSL_cleanse(&tx, sizeof tx);
    OPENSSL_cleanse(&rx, sizeof rx);
  };
  if (::setsockopt(c.fd, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls") != 0) {
    out.why = ulp_error_text(errno);
    wipe();
    return out;
  }
  // With the ULP attached but no keys yet, the socket still carries bytes as they are: a refusal of TLS_TX
  // leaves user-space TLS possible. Once TX is on, RX must follow.
  if (::setsockopt(c.fd, SOL_TLS, TLS_TX, &tx, socklen_t(tx_size)) != 0) {
    out.why = "TLS_TX: " + errno_string(errno);
    wipe();
    return out;
  }
  if (::setsockopt(c.fd, SOL_TLS, TLS_RX, &rx, socklen_t(rx_size)) != 0) {
    out.fatal = true;
    out.why = "kTLS took the send keys but refused the receive keys (TLS_RX: " + errno_string(errno) +
              "); set DSTX_KTLS=off to use user-space TLS";
    wipe();
    return out;
  }
  wipe();
  // Our peer never pads records: let the kernel decrypt in place (6.0+; older kernels refuse, harmlessly).
  const int one = 1;
  (void)::setsockopt(c.fd, SOL_TLS, TLS_RX_EXPECT_NO_PAD, &one, sizeof one);
  out.enabled = true;
  return out;
}

// DSTX_KTLS: "off" never, "on" required (fail when unavailable), unset or "auto" when available.
enum class KtlsPolicy { off, on, auto_ };
bool ktls_policy(KtlsPolicy* out, std::string* err) {
  const char* v = std::getenv("DSTX_KTLS");
  const std::string s = v ? v : "";
  if (s.empty() || s == "auto")
    *out = KtlsPolicy::auto_;
  else if (s == "off" || s == "0" || s == "no")
    *out = KtlsPolicy::off;
  else if (s == "on" || s == "1" || s == "yes" || s == "require")
    *out = KtlsPolicy::on;
  else {
    *err = "DSTX_KTLS='" + s + "': expected auto, on or off";
    return false;
  }
  return true;
}

// ---- user-space relay -------------------------------------------------------------------------------------

struct ErrorSink {
  std::mutex mu;
  std::string first;
  bool closed = false;
  void set(const std::string& who, const std::string& text) {
    std::lock_guard lock(mu);
    if (first.empty() && !closed) first = who + ": " + text;
  }
  bool failed() {
    std::lock_guard lock(mu);
    return !first.empty();
  }
  // The error so far, and no more: later ones are consequences of the failure being reported.
  std::string take_and_close() {
    std::lock_guard lock(mu);
    closed = true;
    return std::exchange(first, std::string());
  }
  std::string get() {
    std::lock_guard lock(mu);
    return first;
  }
};

// One stream of user-space TLS: the engine reads and writes plain bytes on its end of a socketpair (app),
// the relay thread moves them through SSL_write/SSL_read on the real socket (net). Bounded: one buffer per
// direction. A TLS failure shuts the engine's end down both ways, so the engine sees a closed connection.
class Relay {
 public:
  Relay(std::unique_ptr<Conn> conn, io::Fd net, io::Fd app, ErrorSink* errors, std::string who)
      : conn_(std::move(conn)),
        net_(std::move(net)),
        app_(std::move(app)),
        errors_(errors),
        who_(std::move(who)) {
    wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake_) throw std::system_error(errno, std::generic_category(), "eventfd");
    thread_ = std::thread([this] {
      try {
        run();
      } catch (const std::exception& e) {  // nothing may escape a thread (std::terminate)
        fail(std::string("relay: ") + e.what());
      }
    });
  }
  ~Relay() { finish(Clock::now() + kRelayFlush); }

  // Flushes what the engine wrote (until the deadline), ends the stream with a FIN, stops.
  void finish(Clock::time_point deadline) {
    if (!thread_.joinable()) return;
    deadline_ns_.store(deadline.time_since_epoch().count(), std::memory_order_relaxed);
    finishing_.store(true, std::memory_order_release);
    const uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);
    thread_.join();
  }

 private:
  // Both ends hear of it now: the engine (its end closes) and the peer (its connection closes), not when
  // the session goes.
  void fail(const std::string& text) {
    if (!finishing_.load(std::memory_order_acquire)) errors_->set(who_, text);
    ::shutdown(app_.get(), SHUT_RDWR);
    ::shutdown(net_.get(), SHUT_RDWR);
  }

  // Failure of SSL_write: the peer may have sent an alert (e.g. it refused our certificate after our side of
  // the handshake completed) that explains the reset better than the reset does.
  std::string write_failure(int e) {
    std::string text = ssl_failure(*conn_, e, false);
    char tmp[512];
    ERR_clear_error();
    const int n = SSL_read(conn_->ssl.get(), tmp, sizeof tmp);
    if (n <= 0 && SSL_get_error(conn_->ssl.get(), n) == SSL_ERROR_SSL) {
      const Errors errors = Errors::take();
      if (const int alert = errors.alert(); alert >= 0) {
        text = std::string("the peer sent TLS alert '") + SSL_alert_desc_string_long(alert) + "'";
        if (const std::string hint = alert_hint(alert, conn_->config->psk_mode); !hint.empty())
          text += ": " + hint;
      }
    }
    ERR_clear_error();
    return text;
  }

  void run() {
    std::vector<char> up(kRelayBuffer), down(kRelayBuffer);
    size_t ub = 0, ue = 0, db = 0, de = 0;
    bool app_eof = false, net_eof = false, close_sent = false, app_out_closed = false;
    bool w_wants_read = false, w_wants_write = false, r_wants_write = false;
    SSL* ssl = conn_->ssl.get();
    const int a = app_.get();
    const int s = net_.get();
    for (;;) {
      const bool finishing = finishing_.load(std::memory_order_acquire);
      const auto deadline = Clock::time_point(Clock::duration(deadline_ns_.load(std::memory_order_relaxed)));
      if (finishing && Clock::now() >= deadline) return;
      bool progress = false;

      // net → down (first: an alert explains a failure better than a failed write does)
      if (!net_eof && !finishing && de < kRelayBuffer) {
        ERR_clear_error();
        const int n = SSL_read(ssl, down.data() + de, int(kRelayBuffer - de));
        r_wants_write = false;
        if (n > 0) {
          de += size_t(n);
          progress = true;
        } else {
          const int e = SSL_get_error(ssl, n);
          if (e == SSL_ERROR_WANT_WRITE) {
            r_wants_write = true;
          } else if (e == SSL_ERROR_ZERO_RETURN) {
            net_eof = true;
            progress = true;
          } else if (e != SSL_ERROR_WANT_READ) {
            const std::string why = ssl_failure(*conn_, e, false);
            if (!conn_->eof) {
              fail(why);
              return;
            }
            // The peer closed without close_notify (no dstx peer sends one: see below): what arrived is
            // authentic, so deliver it and end the stream; the engine's END and digests catch a truncation.
            net_eof = true;
            progress = true;
          }
        }
      }
      // down → app
      if (db < de && !app_out_closed) {
        const ssize_t n = ::send(a, down.data() + db, de - db, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
          db += size_t(n);
          progress = true;
        } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          app_out_closed = true;  // the engine closed its end: nobody wants these bytes
          progress = true;
        }
      }
      if (app_out_closed || db == de) db = de = 0;
      if (net_eof && de == 0 && !app_out_closed) {
        ::shutdown(a, SHUT_WR);  // the peer's end of stream: the engine's too
        app_out_closed = true;
        progress = true;
      }

      // app → up. While finishing, what the engine wrote is all there is: "would block" means end.
      if (!app_eof && ue < kRelayBuffer) {
        const ssize_t n = ::recv(a, up.data() + ue, kRelayBuffer - ue, MSG_DONTWAIT);
        if (n > 0) {
          ue += size_t(n);
          progress = true;
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) || finishing) {
          app_eof = true;
          progress = true;
        }
      }
      // up → net
      if (ub < ue) {
        ERR_clear_error();
        const int n = SSL_write(ssl, up.data() + ub, int(ue - ub));
        w_wants_read = w_wants_write = false;
        if (n > 0) {
          ub += size_t(n);
          progress = true;
        } else {
          const int e = SSL_get_error(ssl, n);
          if (e == SSL_ERROR_WANT_WRITE) {
            w_wants_write = true;
          } else if (e == SSL_ERROR_WANT_READ) {
            w_wants_read = true;
          } else {
            fail(write_failure(e));
            return;
          }
        }
        if (ub == ue) {
          ub = ue = 0;
        } else if (ub >= kRelayBuffer / 2 && !w_wants_write && !w_wants_read) {
          std::memmove(up.data(), up.data() + ub, ue - ub);  // no write pending retry: free to move
          ue -= ub;
          ub = 0;
        }
      }
      // The engine's stream ended and all of it went out: end ours with a FIN, as kTLS does, not with
      // close_notify. A kTLS peer reads that alert as an error (EIO from recv), which would turn the end of a
      // committed transfer into a broken connection; truncation is caught by the engine's own framing (END,
      // COMMITTED and their digests), never taken for success.
      if (app_eof && ub == ue && !close_sent) {
        close_sent = true;
        ::shutdown(s, SHUT_WR);
        progress = true;
      }
      if (close_sent && ((net_eof && app_out_closed) || finishing)) return;
      if (progress) continue;

      short ae = 0, se = 0;
      if (!app_eof && ue < kRelayBuffer) ae |= POLLIN;
      if (de > db && !app_out_closed) ae |= POLLOUT;
      if ((!net_eof && !finishing && de < kRelayBuffer) || w_wants_read) se |= POLLIN;
      if (w_wants_write || r_wants_write) se |= POLLOUT;
      pollfd p[3] = {{.fd = ae ? a : -1, .events = ae, .revents = 0},
                     {.fd = se ? s : -1, .events = se, .revents = 0},
                     {.fd = wake_.get(), .events = POLLIN, .revents = 0}};
      int timeout = -1;
      if (finishing) {
        timeout = int(std::max<int64_t>(
            1, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()));
      }
      const int r = ::poll(p, 3, timeout);
      if (r < 0 && errno != EINTR) {
        fail("poll: " + errno_string(errno));
        return;
      }
      if (r > 0 && (p[2].revents & POLLIN)) {
        uint64_t v;
        (void)!::read(wake_.get(), &v, sizeof v);
      }
    }
  }

  std::unique_ptr<Conn> conn_;
  io::Fd net_;
  io::Fd app_;
  io::Fd wake_;
  ErrorSink* errors_;
  const std::string who_;
  std::atomic<bool> finishing_{false};
  std::atomic<int64_t> deadline_ns_{0};
  std::thread thread_;
};

// Sends an ABORTED frame carrying `text` (a refusal before any session exists). Best effort.
void send_refusal(int fd, const std::string& text) {
  std::vector<std::byte> frame(wire::kHeaderBytes + text.size());
  wire::encode_header(wire::make_aborted(Reason::protocol, text.size()),
                      std::span<std::byte, wire::kHeaderBytes>(frame.data(), wire::kHeaderBytes));
  std::memcpy(frame.data() + wire::kHeaderBytes, text.data(), text.size());
  size_t off = 0;
  while (off < frame.size()) {
    const ssize_t n = ::send(fd, frame.data() + off, frame.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n <= 0) break;
    off += size_t(n);
  }
}

// Reads the receiver's refusal on a stream whose HELLO went out: one ABORTED frame, with its reason and worded
// as the sender words it without TLS ("receiver refused (reason): text"). No error when something else (or
// nothing, by the deadline) is there.
HandshakeError read_refusal(int fd, Clock::time_point deadline) {
  const HeaderRead hr = recv_header_by(fd, wire::kMaxChunkBytes, deadline);
  if (hr.kind != HeaderRead::ok || hr.header.type != wire::FrameType::aborted) return {};
  const Reason reason = wire::reason_from_peer(hr.header.aux);
  return {reason, refusal_text(reason, recv_abort_text_by(fd, hr.header, deadline)), true};
}

// Peeks at the first bytes without consuming them: waits until `want` bytes are there, the peer closed, or
// the deadline. Returns the bytes seen (possibly fewer), or -errno / -ETIMEDOUT.
int peek(int fd, unsigned char* buf, size_t want, Clock::time_point deadline,
         const std::function<bool()>& give_up = {}) {
  for (;;) {
    if (give_up && give_up()) return -ECANCELED;
    // In slices, so that give_up is asked every 100 ms.
    const int w = wait_fd(fd, POLLIN, std::min(deadline, Clock::now() + std::chrono::milliseconds(100)));
    if (w == 0 && Clock::now() < deadline) continue;
    if (w == 0) return -ETIMEDOUT;
    if (w < 0) return w;
    ssize_t n = ::recv(fd, buf, want, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n < 0) return -errno;
    if (n == 0 || size_t(n) >= want) return int(n);
    // Fewer bytes than wanted: wait a little for the rest (poll stays readable, so sleep briefly).
    if (Clock::now() >= deadline) return int(n);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

// ---- public -----------------------------------------------------------------------------------------------

namespace tls_detail {
bool traffic_keys(uint16_t suite, const std::vector<uint8_t>& secret, std::vector<uint8_t>* key,
                  std::vector<uint8_t>* iv) {
  const char* digest = nullptr;
  size_t key_len = 0;
  if (!suite_params(suite, &digest, &key_len)) return false;
  return expand_label(digest, secret, "key", key_len, key) && expand_label(digest, secret, "iv", 12, iv);
}
}  // namespace tls_detail

std::string check_tls_options(const TlsOptions& o) {
  const bool certs = !o.ca_file.empty() || !o.cert_file.empty() || !o.key_file.empty();
  if (!o.psk_file.empty() && (certs || !o.peer_name.empty())) {
    return "--psk-file cannot be combined with --tls-ca, --tls-cert, --tls-key or --tls-peer-name";
  }
  if (!o.psk_file.empty()) return {};
  if (!o.peer_name.empty() && !certs) return "--tls-peer-name needs --tls-ca, --tls-cert and --tls-key";
  if (certs) {
    std::string missing;
    for (auto [name, value] : {std::pair{"--tls-ca", &o.ca_file}, std::pair{"--tls-cert", &o.cert_file},
                               std::pair{"--tls-key", &o.key_file}}) {
      if (value->empty()) missing += (missing.empty() ? "" : " and ") + std::string(name);
    }
    if (!missing.empty()) {
      return "certificate authentication needs --tls-ca, --tls-cert and --tls-key together (missing " +
             missing + ")";
    }
  }
  return {};
}

std::string validate_tls_options(const TlsOptions& o) {
  if (!o.enabled()) return {};
  std::string err;
  if (!build_config(o, TlsRole::client, &err)) return err;
  return {};
}

const std::string& ktls_unavailable_reason() {
  static const std::string reason = [] {
    const int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int c = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    std::string why;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    int a = -1;
    if (l < 0 || c < 0 || ::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(l, 1) != 0 || ::getsockname(l, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        ::connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      why = "probe: loopback TCP: " + errno_string(errno);
    } else if (::setsockopt(c, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls") != 0) {
      why = ulp_error_text(errno);
    }
    a = l >= 0 ? ::accept4(l, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC) : -1;
    for (int fd : {a, c, l}) {
      if (fd >= 0) ::close(fd);
    }
    return why;
  }();
  return reason;
}

struct TlsSession::Impl {
  std::unique_ptr<Config> config;
  std::vector<std::unique_ptr<Relay>> relays;
  ErrorSink errors;
  std::mutex mu;
  bool enabled = false;
  unsigned ktls_streams = 0;
  unsigned user_streams = 0;
  std::string cipher;
  std::string ktls_why;

  ~Impl() {
    const auto deadline = Clock::now() + kRelayFlush;
    for (auto& r : relays) r->finish(deadline);
  }

  HandshakeError configure(const TlsOptions& o, TlsRole role) {
    if (config) return {};
    std::string err;
    config = build_config(o, role, &err);
    if (!config) return {Reason::internal, err};
    enabled = true;
    return {};
  }

  // After a successful handshake: kTLS or a relay. `fd` is replaced by the relay's app end.
  HandshakeError finish_stream(std::unique_ptr<Conn> conn, io::Fd& fd, unsigned index, KtlsPolicy policy) {
    {
      std::lock_guard lock(mu);
      if (cipher.empty()) cipher = SSL_get_cipher_name(conn->ssl.get());
    }
    std::string why = "DSTX_KTLS=off";
    if (policy != KtlsPolicy::off) {
      const KtlsOutcome k = enable_ktls(*conn);
      if (k.enabled) {
        std::lock_guard lock(mu);
        ++ktls_streams;
        return {};  // the SSL object is done with: the kernel holds the keys
      }
      if (k.fatal) return {Reason::internal, k.why};
      if (policy == KtlsPolicy::on)
        return {Reason::internal, "kTLS required (DSTX_KTLS=on) but unavailable: " + k.why};
      why = k.why;
    }
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
      return {Reason::internal, "socketpair: " + errno_string(errno)};
    io::Fd app(sv[0]), relay_end(sv[1]);
    io::Fd net = std::move(fd);
    fd = std::move(app);
    // The relay owns the socket from here: let OpenSSL read many records per recv() (never before kTLS
    // was ruled out: what OpenSSL reads ahead, the kernel would never see).
    SSL_set_read_ahead(conn->ssl.get(), 1);
    SSL_set_default_read_buffer_len(conn->ssl.get(), 64 << 10);
    try {
      auto relay = std::make_unique<Relay>(
          std::move(conn), std::move(net), std::move(relay_end), &errors,
          (config->role == TlsRole::client ? "stream " : "connection ") + std::to_string(index));
      std::lock_guard lock(mu);
      relays.push_back(std::move(relay));
      ++user_streams;
      if (ktls_why.empty()) ktls_why = why;
    } catch (const std::exception& e) {
      return {Reason::internal, std::string("TLS relay: ") + e.what()};
    }
    return {};
  }
};

TlsSession::TlsSession() : impl_(std::make_unique<Impl>()) {}
TlsSession::~TlsSession() = default;

HandshakeError TlsSession::secure_client(std::vector<io::Fd>& conns, const TlsOptions& options,
                                         int timeout_ms, const wire::Hello* hello, unsigned first_index,
                                         const std::function<bool()>& stop) {
  if (!options.enabled()) return {};
  if (HandshakeError e = impl_->configure(options, TlsRole::client)) return e;
  KtlsPolicy policy;
  std::string perr;
  if (!ktls_policy(&policy, &perr)) return {Reason::internal, perr};
  std::vector<int> sockets;
  for (const io::Fd& c : conns) sockets.push_back(c.get());
  std::vector<HandshakeResult> results(conns.size());
  std::atomic<bool> failed{false};
  // Per stream, under `mu`: still in its handshake. Once through, a stream's socket belongs to its relay (or
  // the kernel) and may carry the receiver's refusal: another stream's failure must not cut it.
  std::mutex mu;
  std::vector<char> in_handshake(conns.size(), 1);
  // Per stream that got through (HELLO sent): the engine's end, else -1. The receiver answers the HELLOs
  // only once every stream's is in, so anything readable there before that is its refusal (ABORTED, then it
  // hangs up): the streams still in their handshake will never be served, and need not wait for a time-out.
  std::vector<std::atomic<int>> through(conns.size());
  for (auto& t : through) t.store(-1);
  auto receiver_spoke = [&] {
    for (const auto& t : through) {
      pollfd p{.fd = t.load(), .events = POLLIN, .revents = 0};
      if (p.fd >= 0 && ::poll(&p, 1, 0) > 0) return true;
    }
    return false;
  };
  // One thread per stream: handshake, hand the keys to the kernel or start a relay, then send the stream's
  // HELLO. The receiver reads a stream's HELLO before it accepts the next connection, and may take them in
  // any order: every stream must get through on its own.
  auto one = [&](size_t i) {
    auto c = std::make_unique<Conn>();
    c->config = impl_->config.get();
    c->fd = sockets[i];
    // A relay's failure abandons the streams' first handshakes (the transfer is failing), not a
    // reconnection's (hello null): the broken connection's relay has failed by then, as it should.
    HandshakeResult r = handshake(*impl_->config, *c, timeout_ms, [&] {
      return failed.load() || (hello && impl_->errors.failed()) || receiver_spoke() || (stop && stop());
    });
    ERR_clear_error();
    {
      std::lock_guard lock(mu);
      in_handshake[i] = 0;
    }
    if (!r.error) r.error = impl_->finish_stream(std::move(c), conns[i], first_index + unsigned(i), policy);
    if (!r.error && hello) {
      wire::Hello h = *hello;
      h.stream_index = uint16_t(i);
      std::byte frame[wire::kHeaderBytes + wire::kHelloBytes];
      wire::encode_header(wire::Header{.type = wire::FrameType::hello, .payload_len = wire::kHelloBytes},
                          std::span<std::byte, wire::kHeaderBytes>(frame, wire::kHeaderBytes));
      wire::encode_hello(
          h, std::span<std::byte, wire::kHelloBytes>(frame + wire::kHeaderBytes, wire::kHelloBytes));
      const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 86400000 : timeout_ms);
      size_t off = 0;
      while (off < sizeof frame) {
        const ssize_t n =
            ::send(conns[i].get(), frame + off, sizeof frame - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
          off += size_t(n);
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
          if (wait_fd(conns[i].get(), POLLOUT, deadline) <= 0) {
            r.error = {Reason::timeout, "send HELLO: timed out"};
            break;
          }
        } else {
          r.error = {Reason::connection, "send HELLO: " + errno_string(errno)};
          r.generic = true;
          break;
        }
      }
      if (!r.error) through[i].store(conns[i].get());
    }
    if (r.error && conns.size() > 1 && !failed.exchange(true)) {
      // Stop the other handshakes now rather than at their time-out. Only those: a stream that got through
      // may yet bring the receiver's reason (its refusal of the transfer is what closed this one).
      std::lock_guard lock(mu);
      for (size_t k = 0; k < sockets.size(); ++k) {
        if (k != i && in_handshake[k]) ::shutdown(sockets[k], SHUT_RDWR);
      }
    }
    results[i] = std::move(r);
  };
  std::vector<std::thread> threads;
  try {
    for (size_t i = 1; i < conns.size(); ++i) threads.emplace_back(one, i);
  } catch (const std::system_error& e) {  // no thread to spare (a pids limit): stop those started
    failed = true;
    {
      std::lock_guard lock(mu);
      for (size_t k = 0; k < sockets.size(); ++k) {
        if (in_handshake[k]) ::shutdown(sockets[k], SHUT_RDWR);
      }
    }
    for (auto& t : threads) t.join();
    return {Reason::internal, std::string("starting the streams' TLS handshakes: ") + e.what()};
  }
  if (!conns.empty()) one(0);
  for (auto& t : threads) t.join();
  // The most telling failure: a refusal with a reason beats a connection closed because of it.
  int pick = -1;
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].error) continue;
    if (pick < 0 || (results[size_t(pick)].generic && !results[i].generic)) pick = int(i);
  }
  if (pick >= 0) {
    HandshakeError e = results[size_t(pick)].error;
    e.text = "stream " + std::to_string(first_index + unsigned(pick)) + ": " + e.text;
    // In TLS 1.3 our side of the handshake completes before the receiver has checked our certificate: its
    // verdict (an alert) reaches a stream's relay, and the other streams only see the receiver hang up.
    // Give a stream that got through a moment to read that verdict.
    const bool any_through =
        std::any_of(results.begin(), results.end(), [](const HandshakeResult& r) { return !r.error; });
    // Likewise for the receiver's refusal (an ABORTED frame) on a stream that got through.
    const auto deadline = Clock::now() + kRefusalGrace;
    while (any_through && results[size_t(pick)].generic && !impl_->errors.failed() && !receiver_spoke() &&
           Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const std::string relay = conns.size() > 1 ? impl_->errors.take_and_close() : std::string();
    if (results[size_t(pick)].generic && relay.find("TLS alert") != std::string::npos) {
      e = {Reason::protocol, relay};
    } else if (results[size_t(pick)].generic) {
      // The receiver refused the transfer (say stream 0's HELLO asks for more than it allows): that, in its
      // words, is why the other streams were closed or never served.
      for (size_t i = 0; i < through.size(); ++i) {
        if (through[i].load() < 0) continue;
        if (HandshakeError refusal = read_refusal(through[i].load(), deadline)) {
          refusal.text = "stream " + std::to_string(i) + ": " + refusal.text;
          return refusal;
        }
      }
    }
    return e;
  }
  return {};
}

HandshakeError TlsSession::secure_server(io::Fd& conn, const TlsOptions& options, int timeout_ms,
                                         const std::function<bool()>& give_up) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 86400000 : timeout_ms);
  unsigned char first[4] = {};
  if (!options.enabled()) {
    // A TLS client at a plaintext receiver: its first byte is a handshake record's type, 22.
    const int n = peek(conn.get(), first, 1, deadline, give_up);
    if (n == -ETIMEDOUT) return {Reason::timeout, "no HELLO within " + std::to_string(timeout_ms) + " ms"};
    if (n == -ECANCELED) return {Reason::cancelled, "cancelled during the handshake"};
    if (n >= 1 && first[0] == 0x16) {
      const std::string text =
          "peer speaks TLS (ClientHello); start this side with --tls-ca/--tls-cert/--tls-key or --psk-file";
      send_refusal(conn.get(),
                   "this receiver does not use TLS: the sender must not either, or start the "
                   "receiver with --tls-ca/--tls-cert/--tls-key or --psk-file");
      return {Reason::protocol, text};
    }
    return {};  // plaintext, a closed connection or an error: the HELLO reader says which
  }
  if (HandshakeError e = impl_->configure(options, TlsRole::server)) return e;
  KtlsPolicy policy;
  std::string perr;
  if (!ktls_policy(&policy, &perr)) return {Reason::internal, perr};
  const int n = peek(conn.get(), first, 4, deadline, give_up);
  if (n == -ETIMEDOUT) {
    return {Reason::timeout, "no TLS ClientHello within " + std::to_string(timeout_ms) + " ms"};
  }
  if (n == -ECANCELED) return {Reason::cancelled, "cancelled during the handshake"};
  if (n == 0 || n == -ECONNRESET) {
    return {.reason = Reason::connection, .text = "peer closed before its first byte", .silent = true};
  }
  if (n == 4 && std::memcmp(first, "DSXF", 4) == 0) {
    send_refusal(conn.get(),
                 "this receiver requires TLS: start the sender with --tls-ca/--tls-cert/--tls-key or "
                 "--psk-file");
    return {Reason::protocol, "peer did not start TLS (plaintext dstx HELLO?)"};
  }
  auto c = std::make_unique<Conn>();
  c->config = impl_->config.get();
  c->fd = conn.get();
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  HandshakeResult r = handshake(*impl_->config, *c, int(std::max<int64_t>(1, left)), give_up);
  ERR_clear_error();
  // The handshake had what was left of the time-out: its time-out names the whole.
  if (r.error.reason == Reason::timeout && timeout_ms >= 0)
    r.error.text = "TLS handshake did not complete within " + std::to_string(timeout_ms) + " ms";
  if (r.error) return r.error;
  unsigned index;
  {
    std::lock_guard lock(impl_->mu);
    index = impl_->ktls_streams + impl_->user_streams;
  }
  return impl_->finish_stream(std::move(c), conn, index, policy);
}

std::string TlsSession::describe() const {
  std::lock_guard lock(impl_->mu);
  if (!impl_->enabled || impl_->ktls_streams + impl_->user_streams == 0) return "none";
  const std::string auth = impl_->config->psk_mode ? "pre-shared key" : "certificates";
  const std::string what = "TLS 1.3 " + impl_->cipher + ", " + auth;
  if (impl_->user_streams == 0) return "kTLS (" + what + ")";
  if (impl_->ktls_streams == 0)
    return "user-space TLS (" + what + "; kTLS unavailable: " + impl_->ktls_why + ")";
  return "kTLS on " + std::to_string(impl_->ktls_streams) + " streams, user-space TLS on " +
         std::to_string(impl_->user_streams) + " (" + what + "; " + impl_->ktls_why + ")";
}

std::string TlsSession::annotate(std::string engine_error) const {
  const std::string relay = impl_->errors.get();
  if (!relay.empty()) return engine_error + " (TLS: " + relay + ")";
  bool ktls = false;
  {
    std::lock_guard lock(impl_->mu);
    ktls = impl_->ktls_streams > 0;
  }
  if (ktls && (engine_error.find("Input/output error") != std::string::npos ||
               engine_error.find("Bad message") != std::string::npos)) {
    return engine_error +
           " (kTLS: the peer sent a TLS alert or a non-data record, e.g. after refusing our certificate, or "
           "a "
           "record that failed authentication)";
  }
  return engine_error;
}

}  // namespace dstx::engine
