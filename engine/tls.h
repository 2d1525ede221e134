// Authenticated, encrypted streams: TLS 1.3 (OpenSSL) on every connection of a transfer, with mutual
// certificate authentication or an external pre-shared key.
//
// After the handshake the session keys go to the kernel (kTLS, TCP_ULP "tls") when it offers TLS offload:
// the engine's io_uring or syscall path then keeps sending and receiving plain buffers on the same socket and
// the kernel encrypts and authenticates each record. OpenSSL 3.0 (Debian 12) hands only the TLS 1.3 send
// keys to the kernel itself (its tls13_change_cipher_state skips the read side), so both directions' keys
// are derived here from the traffic secrets (RFC 8446 7.3) and installed with setsockopt(SOL_TLS, TLS_TX and
// TLS_RX). No session tickets are sent, and streams end with a FIN, not close_notify, so nothing but
// application data follows the handshake (a kTLS recv() fails with EIO on any other record type); the
// engine's framing (END, COMMITTED, digests) catches a truncation.
//
// Where kTLS is unavailable (kernel without CONFIG_TLS, a UNIX socket, DSTX_KTLS=off), the engine gets one
// end of a socketpair instead and a relay thread per stream pumps between it and SSL_read/SSL_write on the
// real socket ("user-space TLS"). A relay's TLS failure closes the engine's end: the engine sees a closed
// connection and the TLS reason is appended to its error (annotate()).
//
// Never a silent downgrade: a side configured for TLS refuses a peer that does not start TLS, and a side
// without TLS refuses (with a clear reason) a peer whose first bytes are a TLS ClientHello.
//
// Internal to engine/ (the CLI and the C ABI fill TlsOptions).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/wire.h"
#include "io/socket.h"

namespace dstx::engine {

struct TlsOptions {
  std::string ca_file;    // PEM: the CA(s) that must have issued the peer's certificate
  std::string cert_file;  // PEM: our certificate (chain)
  std::string key_file;   // PEM: our private key
  std::string peer_name;  // optional: a DNS name or IP address the peer's certificate must carry in its
                          // subjectAltName (without it any certificate issued by the CA is accepted)
  std::string psk_file;   // "IDENTITY:HEXKEY" (key 16..64 bytes): the alternative to certificates
  bool enabled() const {
    return !ca_file.empty() || !cert_file.empty() || !key_file.empty() || !peer_name.empty() ||
           !psk_file.empty();
  }
};

// Checks the combination of options only (certificates need CA, certificate and key together; a PSK excludes
// them). Returns an empty string or what is wrong, naming the options as the CLI spells them.
std::string check_tls_options(const TlsOptions& options);
// check_tls_options, then loads every file (certificates, key, key against certificate, PSK file) the way
// a transfer would. Returns an empty string or what is wrong.
std::string validate_tls_options(const TlsOptions& options);

// A failed handshake (dstx's HELLO, or securing a connection with TLS) as it is reported: empty text when
// it did not fail. refused: the receiver answered ABORTED, and `reason` is its own, as for an ABORTED later
// in the transfer; it will not take this session back, so there is no point in reconnecting.
struct HandshakeError {
  wire::Reason reason = wire::Reason::unspecified;
  std::string text;
  bool refused = false;
  // The peer closed or reset the connection before its first byte: a port scan or a health check rather
  // than a sender (the receiver does not end a receive for it).
  bool silent = false;
  explicit operator bool() const { return !text.empty(); }
};

enum class TlsRole : uint8_t { client, server };  // client: the sender; server: the receiver

// The TLS state of one transfer: every stream's session, and the relays of user-space TLS. Its calls may come
// from several threads (reconnections are secured while the transfer runs). Destroy it after the engine
// stopped using the streams: a relay then flushes what the engine wrote (bounded by a few seconds), sends
// its FIN (no close_notify: see above), and stops.
class TlsSession {
 public:
  TlsSession();
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // Client: when options.enabled(), handshakes on every connection, hands the keys to the kernel or
  // replaces the fd with its relay's end, and sends the stream's HELLO (`hello` with stream_index set to the
  // stream's index) right away: the receiver reads each stream's HELLO before it accepts the next
  // connection, in whatever order they reach it, so all streams proceed at once, each on its own. Returns no
  // error (every HELLO is sent), or the most telling failure prefixed with its stream ("stream 2: ...").
  // With `hello` null (a reconnection of one stream), no HELLO is sent: the caller sends its own.
  // `first_index`: the stream conns[0] is (a reconnection's), for its relay's name and the error's prefix.
  // `stop` (asked every 100 ms): the caller gave up (a cancel); the handshakes end at once.
  HandshakeError secure_client(std::vector<io::Fd>& conns, const TlsOptions& options, int timeout_ms,
                               const wire::Hello* hello, unsigned first_index = 0,
                               const std::function<bool()>& stop = {});

  // Server, for one accepted connection, before its HELLO is read. With TLS: refuses a peer whose first
  // bytes are a plaintext dstx frame (answering with an ABORTED frame that says why), else handshakes and
  // secures `conn` as above. Without TLS: refuses a peer whose first byte starts a TLS handshake record
  // (again answering with ABORTED), else leaves the connection untouched. Returns no error or why the
  // connection was refused.
  // `give_up` (asked every 100 ms): stop waiting for the peer (reason cancelled, or the handshake's time-out
  // text once the TLS handshake proper runs).
  HandshakeError secure_server(io::Fd& conn, const TlsOptions& options, int timeout_ms,
                               const std::function<bool()>& give_up = {});

  // "none", "kTLS (...)", "user-space TLS (...)": the mode first, then the cipher, the authentication and,
  // for user-space TLS, why kTLS is not in use.
  std::string describe() const;

  // The engine's error text, with the first TLS failure the relays saw appended (or a hint for kTLS errors
  // that only the kernel saw). Thread-safe.
  std::string annotate(std::string engine_error) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// kTLS availability on this host: tries TCP_ULP "tls" on a loopback TCP connection (cached). Empty when
// available, else why not.
const std::string& ktls_unavailable_reason();

namespace tls_detail {
// Exposed for tests: the record protection key and IV of a TLS 1.3 traffic secret (RFC 8446 7.3,
// HKDF-Expand-Label with the suite's hash). `suite` is the IANA cipher suite number (0x1301, 0x1302, 0x1303).
// Returns false for an unknown suite or a KDF failure.
bool traffic_keys(uint16_t suite, const std::vector<uint8_t>& secret, std::vector<uint8_t>* key,
                  std::vector<uint8_t>* iv);
}  // namespace tls_detail

}  // namespace dstx::engine
