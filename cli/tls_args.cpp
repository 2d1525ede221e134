#include "cli/tls_args.h"

namespace dstx::cli {

std::set<std::string> with_tls_options(std::set<std::string> with_value) {
  with_value.insert({"tls-ca", "tls-cert", "tls-key", "tls-peer-name", "psk-file"});
  return with_value;
}

const char* const kTlsHelp =
    "  --tls-ca FILE --tls-cert FILE --tls-key FILE\n"
    "                      TLS 1.3 on every stream, both sides authenticated by certificates (PEM): the\n"
    "                      peer's must be issued by the CA in --tls-ca; the other side needs TLS too\n"
    "  --tls-peer-name NAME  the DNS name or IP address the peer's certificate must carry in its\n"
    "                      subjectAltName (without it, any certificate from the CA is accepted)\n"
    "  --psk-file FILE     TLS 1.3 with a pre-shared key instead of certificates: one line IDENTITY:HEXKEY\n"
    "                      (16 to 64 bytes of key, the same file on both sides)\n"
    "                      The kernel encrypts (kTLS) where it can; DSTX_KTLS=off forces user-space TLS\n";

engine::TlsOptions tls_options(const Args& args) {
  engine::TlsOptions o;
  o.ca_file = args.get("tls-ca").value_or("");
  o.cert_file = args.get("tls-cert").value_or("");
  o.key_file = args.get("tls-key").value_or("");
  o.peer_name = args.get("tls-peer-name").value_or("");
  o.psk_file = args.get("psk-file").value_or("");
  for (const char* name : {"tls-ca", "tls-cert", "tls-key", "tls-peer-name", "psk-file"}) {
    if (args.has(name) && args.get(name)->empty())
      throw UsageError(std::string("--") + name + " needs a value");
  }
  if (std::string err = engine::check_tls_options(o); !err.empty()) throw UsageError(err);
  if (std::string err = engine::validate_tls_options(o); !err.empty()) throw UsageError(err);
  return o;
}

}  // namespace dstx::cli
