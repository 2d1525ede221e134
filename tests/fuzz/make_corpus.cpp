// Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/): valid inputs of every kind, made
// with the real encoders, a few malformed ones, and, for the receiver, byte streams captured from real
// transfers (engine::send into a socket pair, through a recording relay, to engine::receive_accepted).
//
//   usage: fuzz_make_corpus OUT-DIR        (then review and copy into tests/fuzz/corpus/)
//
// The input layout of each target is described at the top of its source file.
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "compress/codec.h"
#include "engine/transfer.h"
#include "engine/wire.h"
#include "fuzz_support.h"
#include "io/endpoints.h"

namespace {

using namespace dstx;
namespace fs = std::filesystem;
using engine::wire::FrameType;
using engine::wire::Header;
using engine::wire::Hello;
using Bytes = std::vector<std::byte>;

fs::path g_out;

void put(const std::string& target, const std::string& name, const Bytes& bytes) {
  const fs::path dir = g_out / target;
  fs::create_directories(dir);
  std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  FUZZ_CHECK(f.good(), "cannot write %s", (dir / name).c_str());
}

Bytes header_bytes(const Header& h) {
  Bytes b(engine::wire::kHeaderBytes);
  engine::wire::encode_header(h, std::span<std::byte, engine::wire::kHeaderBytes>(b.data(), b.size()));
  return b;
}

Bytes hello_bytes(const Hello& h) {
  Bytes b(engine::wire::kHelloBytes);
  engine::wire::encode_hello(h, std::span<std::byte, engine::wire::kHelloBytes>(b.data(), b.size()));
  return b;
}

Bytes hello_frame(const Hello& h) {
  Bytes b = header_bytes(Header{.type = FrameType::hello, .payload_len = engine::wire::kHelloBytes});
  const Bytes p = hello_bytes(h);
  b.insert(b.end(), p.begin(), p.end());
  return b;
}

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Bytes u8s(std::initializer_list<uint8_t> v) {
  Bytes out;
  for (uint8_t b : v) out.push_back(std::byte{b});
  return out;
}

Bytes le32(uint32_t v) {
  Bytes b(4);
  fuzz::put32(b.data(), v);
  return b;
}

Bytes le64(uint64_t v) {
  Bytes b(8);
  fuzz::put64(b.data(), v);
  return b;
}

// Some compressible, some random-looking, some zero pages.
Bytes sample_chunk(size_t len, uint64_t seed) {
  Bytes b(len);
  const io::ContentGenerator gen(io::Profile::mixed, seed);
  gen.fill(0, b);
  return b;
}

Bytes text_chunk(size_t len) {
  Bytes b(len);
  io::ContentGenerator(io::Profile::text, 3).fill(0, b);
  return b;
}

struct Encoded {
  compress::EncodeResult r;
  Bytes payload;
};

Encoded encode(compress::Codec codec, const Bytes& raw, bool sparse_fallback = false) {
  compress::EncodeOptions o{
      .codec = codec, .level = 3, .probe_incompressible = false, .sparse_fallback = sparse_fallback};
  Bytes out(std::max(compress::encode_bound(codec, raw.size()), raw.size()));
  Encoded e;
  e.r = compress::encode_chunk(o, raw, out);
  if (e.r.zero) return e;
  if (e.r.codec == compress::Codec::none) {
    e.payload = raw;
  } else {
    e.payload.assign(out.begin(), out.begin() + e.r.encoded_len);
  }
  return e;
}

// ---- header: [flags][chunk choice][u32 raw chunk limit][48 header bytes]
void header_corpus() {
  auto h = [&](const std::string& name, const Header& hdr, uint8_t choice = 3) {
    put("header", name, cat({u8s({0, choice}), le32(0), header_bytes(hdr)}));
  };
  for (unsigned c = 0; c < compress::kCodecCount; ++c) {
    const auto codec = compress::Codec(c);
    h("data-" + std::string(compress::codec_name(codec)),
      Header{.type = FrameType::data,
             .codec = uint8_t(c),
             .seq = 7,
             .offset = 1 << 20,
             .raw_len = 65536,
             .payload_len = c == 0 ? 65536u : 9000u,
             .hash = 0x1122334455667788},
      1);
  }
  h("data-zero-eot", Header{.type = FrameType::data,
                            .flags = engine::wire::kFlagZero | engine::wire::kFlagEndOfTransaction,
                            .seq = 1,
                            .raw_len = 4096});
  h("data-max-raw",
    Header{.type = FrameType::data,
           .codec = 2,
           .seq = 1,
           .raw_len = 16u << 20,
           .payload_len = uint32_t(compress::encode_bound(compress::Codec::zstd, 16u << 20))});
  h("hello", Header{.type = FrameType::hello, .payload_len = engine::wire::kHelloBytes});
  h("hello-ack", Header{.type = FrameType::hello_ack, .payload_len = engine::wire::kHelloBytes});
  h("stream-ack", Header{.type = FrameType::stream_ack, .seq = 9});
  h("end", engine::wire::make_end(12, 12 << 20, 0xabcdef));
  h("committed", engine::wire::make_committed(12, 12 << 20, 0xabcdef));
  h("ack", engine::wire::make_ack(5));
  h("aborted", engine::wire::make_aborted(engine::wire::Reason::checksum, 1024));
  // Malformed: above the negotiated chunk, bad magic, bad check, unknown type, unknown flag.
  h("bad-raw-above-limit", Header{.type = FrameType::data, .seq = 1, .raw_len = 65537, .payload_len = 65537},
    1);
  Bytes bad = cat({u8s({0, 3}), le32(0), header_bytes(engine::wire::make_ack(1))});
  bad[6] = std::byte{0x45};  // magic
  put("header", "bad-magic", bad);
  bad = cat({u8s({0, 3}), le32(0), header_bytes(engine::wire::make_ack(1))});
  bad[6 + 47] ^= std::byte{1};  // check
  put("header", "bad-check", bad);
  bad = cat({u8s({1, 3}), le32(0), header_bytes(engine::wire::make_ack(1))});
  bad[6 + 4] = std::byte{9};  // type, with the repair flag so the type rule is what fails
  put("header", "bad-type-repaired", bad);
  bad = cat({u8s({1, 4}), le32(100000),
             header_bytes(Header{
                 .type = FrameType::data, .flags = 4, .seq = 1, .raw_len = 4096, .payload_len = 4096})});
  put("header", "bad-flag-raw-limit", bad);
  // STREAM_ACK carries only seq (docs/wire-format.md: offset and hash 0, as for ACK).
  h("regress-stream-ack-with-offset", Header{.type = FrameType::stream_ack, .seq = 9, .offset = 4096});
  h("regress-stream-ack-with-hash", Header{.type = FrameType::stream_ack, .seq = 9, .hash = 77});
}

// ---- chunk: [codec][flags][u32 raw_len][u64 hash][payload]
void chunk_corpus() {
  auto c = [&](const std::string& name, uint8_t codec, uint8_t flags, uint32_t raw_len, uint64_t hash,
               const Bytes& payload) {
    put("chunk", name, cat({u8s({codec, flags}), le32(raw_len), le64(hash), payload}));
  };
  // Text with page 1 zero (and a short last page), so that sparse applies.
  Bytes raw = text_chunk(13000);
  std::fill(raw.begin() + 4096, raw.begin() + 8192, std::byte{0});
  const Bytes text = text_chunk(5000);
  for (unsigned k = 0; k < compress::kCodecCount; ++k) {
    const auto codec = compress::Codec(k);
    const Bytes& src = codec == compress::Codec::sparse ? raw : text;
    const Encoded e = encode(codec, src);
    FUZZ_CHECK(e.r.codec == codec, "codec %u did not apply to its sample", k);
    c("valid-" + std::string(compress::codec_name(codec)), uint8_t(k), 0, uint32_t(src.size()), e.r.hash,
      e.payload);
    c("repair-" + std::string(compress::codec_name(codec)), uint8_t(k), 2, uint32_t(src.size()), 0,
      e.payload);
    Bytes flipped = e.payload;
    flipped[flipped.size() / 2] ^= std::byte{0x10};
    c("flipped-" + std::string(compress::codec_name(codec)), uint8_t(k), 2, uint32_t(src.size()), e.r.hash,
      flipped);
    c("short-raw-" + std::string(compress::codec_name(codec)), uint8_t(k), 2, uint32_t(src.size() - 1),
      e.r.hash, e.payload);
    c("long-raw-" + std::string(compress::codec_name(codec)), uint8_t(k), 2, uint32_t(src.size() + 4096),
      e.r.hash, e.payload);
  }
  c("zero", 0, 1, 65536, 0, {});
  c("zero-with-payload", 0, 1, 65536, 0, u8s({1, 2, 3}));
  c("none-in-place", 0, 4, 0, compress::hash64(text.data(), 4000), Bytes(text.begin(), text.begin() + 4000));
  c("invalid-codec", 5, 0, 4096, 0, Bytes(100, std::byte{1}));
  c("big-raw-lz4", 1, 8 | 2, (16u << 20), 0, encode(compress::Codec::lz4, text).payload);
  Bytes bitmap_only(1, std::byte{0xff});  // claims 8 pages of a one-page chunk
  c("sparse-bits-past-end", 3, 2, 4096, 0, cat({bitmap_only, Bytes(4096, std::byte{7})}));
  // Paged (flag bit 4): lz4 and zstd over the sparse form of `raw`; the hash's low bits give its length.
  const Encoded sparse = encode(compress::Codec::sparse, raw);
  for (const auto codec : {compress::Codec::lz4, compress::Codec::zstd}) {
    const Encoded e = encode(codec, sparse.payload);
    FUZZ_CHECK(e.r.codec == codec, "codec %u did not apply to a sparse form", unsigned(codec));
    c("paged-" + std::string(compress::codec_name(codec)), uint8_t(codec), 16, uint32_t(raw.size()),
      sparse.payload.size() - 1, e.payload);
  }
  // The hash of the chunk's pages (flag bit 5), for each codec; then a sparse form that marks its zero page
  // present (bitmap 0x0f: all four pages, the zero one among them), which that form calls corrupt.
  for (unsigned k = 0; k < compress::kCodecCount; ++k) {
    const auto codec = compress::Codec(k);
    const Bytes& src = codec == compress::Codec::sparse ? raw : text;
    const Encoded e = encode(codec, src);
    c("pages-valid-" + std::string(compress::codec_name(codec)), uint8_t(k), 32, uint32_t(src.size()),
      compress::chunk_hash(compress::HashForm::pages, src), e.payload);
    c("pages-repair-" + std::string(compress::codec_name(codec)), uint8_t(k), 32 | 2, uint32_t(src.size()), 0,
      e.payload);
  }
  for (const auto codec : {compress::Codec::lz4, compress::Codec::zstd}) {  // paged, pages hash
    const Encoded e = encode(codec, sparse.payload);
    c("pages-paged-" + std::string(compress::codec_name(codec)), uint8_t(codec), 32 | 16 | 2,
      uint32_t(raw.size()), sparse.payload.size() - 1, e.payload);
  }
  c("pages-sparse-zero-page-present", 3, 32 | 2, uint32_t(raw.size()),
    compress::chunk_hash(compress::HashForm::pages, raw), cat({u8s({0x0f}), raw}));
}

// ---- roundtrip: [codec][level + 5][option bits][page bitmap][tail][content]
void roundtrip_corpus() {
  auto r = [&](const std::string& name, uint8_t codec, int level, uint8_t bits, uint8_t bitmap, uint8_t tail,
               const Bytes& content) {
    put("roundtrip", name, cat({u8s({codec, uint8_t(level + 5), bits, bitmap, tail}), content}));
  };
  const Bytes text = text_chunk(3000);
  const Bytes mixed = sample_chunk(3000, 5);
  for (unsigned k = 0; k < compress::kCodecCount; ++k) {
    const std::string n(compress::codec_name(compress::Codec(k)));
    r(n + "-text", uint8_t(k), 1, 1 | 2, 0, 0, text);
    r(n + "-pages", uint8_t(k), 3, 1 | 4 | 8, 0xa5, 7, mixed);
    r(n + "-all-zero-pages", uint8_t(k), 1, 1 | 8, 0, 0, {});
    r(n + "-paged", uint8_t(k), 1, 1 | 8 | 16, 0xa5, 7, text);
    r(n + "-paged-page-hash", uint8_t(k), 1, 1 | 4 | 8 | 16 | 32, 0xa5, 7, text);
  }
  r("none-sparse-fallback", 0, 1, 1 | 4 | 8, 0x0f, 200, text);
  r("zstd-negative-level", 2, -5, 1 | 8, 0xff, 255, mixed);
  r("lz4-tiny", 1, 1, 0, 0, 0, u8s({1, 1}));
  r("empty", 1, 1, 1, 0, 0, {});
}

// ---- handshake: [flags][max streams byte][chunk limit byte][96-byte records]
void handshake_corpus() {
  auto hs = [&](const std::string& name, uint8_t flags, uint8_t streams, uint8_t limit,
                const std::vector<Hello>& hellos) {
    Bytes b = u8s({flags, streams, limit});
    for (const Hello& h : hellos) b = cat({b, hello_frame(h)});
    put("handshake", name, b);
  };
  const Hello one{.stream_count = 1,
                  .max_chunk_bytes = 1 << 20,
                  .session_id = 0x1234,
                  .capabilities = 7,
                  .total_bytes = 1 << 30};
  hs("one-stream", 0, 3, 2, {one});
  Hello a = one, b = one, c = one, d = one;
  a.stream_count = b.stream_count = c.stream_count = d.stream_count = 4;
  a.stream_index = 2, b.stream_index = 0, c.stream_index = 3, d.stream_index = 1;
  a.capabilities = b.capabilities = c.capabilities = d.capabilities = 0xff;  // unknown bits are dropped
  hs("four-streams-any-order", 0, 7, 2, {a, b, c, d});
  hs("four-streams-one-missing", 0, 7, 2, {a, b, c});
  Hello bad = one;
  bad.version = 2;
  hs("refuse-version", 0, 3, 2, {bad});
  bad = one;
  bad.max_chunk_bytes = 2 << 20;
  hs("refuse-chunk-above-limit", 0, 3, 2, {bad});
  bad.max_chunk_bytes = 4095;
  hs("refuse-chunk-below-min", 0, 3, 2, {bad});
  bad = one;
  bad.stream_count = 0;
  hs("refuse-count-zero", 0, 3, 2, {bad});
  hs("refuse-count-above-limit", 0, 2, 2, {a});  // 4 streams, the receiver takes 3
  bad = one;
  bad.stream_index = 1;
  hs("refuse-index", 0, 3, 2, {bad});
  Hello other = d;
  other.session_id = 99;
  hs("refuse-session", 0, 7, 2, {a, b, other});
  hs("refuse-duplicate-index", 0, 7, 2, {a, b, a});
  Bytes t = cat({u8s({0, 3, 2}), hello_frame(one)});
  t.resize(3 + 60);
  put("handshake", "refuse-truncated-hello", t);
  t.resize(3 + 20);
  put("handshake", "refuse-partial-header", t);
  put("handshake", "refuse-garbage", cat({u8s({3, 3, 2}), Bytes(96, std::byte{'G'})}));
  put("handshake", "none", u8s({0, 3, 2}));
  // Limits byte: chunk limit by b % 4, memory budget by b / 4 % 4 (64 MiB, 1 MiB, 16 MiB, 256 MiB).
  Hello big = a;
  big.max_chunk_bytes = 16 << 20;
  Hello big0 = big, big1 = big, big2 = big, big3 = big;
  big0.stream_index = 0, big1.stream_index = 1, big2.stream_index = 2, big3.stream_index = 3;
  hs("refuse-memory-four-large-streams", 0, 7, 3, {big0, big1, big2, big3});
  hs("accept-four-large-streams-big-budget", 0, 7, 3 + 12, {big0, big1, big2, big3});
  Hello small = one;
  small.max_chunk_bytes = 65536;
  hs("accept-small-budget", 0, 3, 1 + 4, {small});
  bad = one;
  bad.flags = engine::wire::kHelloResume;
  bad.resume_seq = 7;
  hs("regress-refuse-resume-hello-without-session", 0, 3, 2, {bad});
  Hello resume_second = d;
  resume_second.flags = engine::wire::kHelloResume;
  hs("regress-refuse-resume-hello-in-handshake", 0, 7, 2, {a, resume_second});
}

// ---- receiver: [fix-up flags][byte stream]
// Runs a real transfer through a relay that records what the sender writes.
Bytes capture(engine::CodecMode mode, uint32_t chunk, io::Profile profile, uint64_t size) {
  int a[2], b[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0, "socketpair");
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) == 0, "socketpair");
  io::Fd send_end(a[0]), relay_sender(a[1]), relay_receiver(b[0]), recv_end(b[1]);
  Bytes captured;
  auto pump = [](int from, int to, Bytes* record) {
    std::byte buf[65536];
    for (;;) {
      const ssize_t n = ::recv(from, buf, sizeof buf, 0);
      if (n <= 0) break;
      if (record) record->insert(record->end(), buf, buf + n);
      if (::send(to, buf, size_t(n), MSG_NOSIGNAL) != n) break;
    }
    ::shutdown(to, SHUT_WR);
  };
  std::thread up(pump, relay_sender.get(), relay_receiver.get(), &captured);
  std::thread down(pump, relay_receiver.get(), relay_sender.get(), nullptr);

  const io::ContentGenerator gen(profile, 21);
  auto src = io::open_emu_source(gen, size);
  auto sink = io::open_emu_sink(gen, size);
  engine::Result rr;
  std::thread receiver([&] {
    std::vector<io::Fd> c;
    c.push_back(std::move(recv_end));
    rr = engine::receive_accepted(*sink, std::move(c), engine::RecvOptions{}, nullptr, nullptr);
  });
  engine::SendOptions so;
  so.streams = 1;
  so.chunk_bytes = chunk;
  so.codec = mode;
  std::vector<io::Fd> c;
  c.push_back(std::move(send_end));
  const engine::Result sr = engine::send(*src, std::move(c), so, nullptr, nullptr);
  receiver.join();
  up.join();
  down.join();
  FUZZ_CHECK(sr.committed && rr.committed, "capture transfer failed: %s / %s", sr.error.c_str(),
             rr.error.c_str());
  return captured;
}

// Splits a stream into frames (header offset, payload length), for describing and cutting captures.
std::vector<std::pair<size_t, size_t>> frames_of(const Bytes& s) {
  std::vector<std::pair<size_t, size_t>> out;
  size_t pos = 0;
  while (s.size() - pos >= engine::wire::kHeaderBytes) {
    Header h;
    engine::wire::decode_header(std::span<const std::byte, 48>(s.data() + pos, 48),
                                engine::wire::kMaxChunkBytes, &h);
    const size_t payload =
        (h.type == FrameType::data && (h.flags & engine::wire::kFlagZero)) ? 0 : h.payload_len;
    out.emplace_back(pos, payload);
    pos += 48 + payload;
  }
  return out;
}

void describe(const std::string& name, const Bytes& s) {
  unsigned per_codec[8] = {}, zero = 0, paged = 0;
  for (auto [pos, len] : frames_of(s)) {
    if (s[pos + 4] != std::byte(FrameType::data)) continue;
    if (uint16_t(s[pos + 6]) & engine::wire::kFlagZero) {
      ++zero;
    } else {
      ++per_codec[uint8_t(s[pos + 5]) & 7];
      if (uint16_t(s[pos + 6]) & engine::wire::kFlagPaged) ++paged;
    }
  }
  std::printf("receiver/%s: %zu bytes; chunks none %u lz4 %u zstd %u sparse %u zero %u (paged %u)\n",
              name.c_str(), s.size(), per_codec[0], per_codec[1], per_codec[2], per_codec[3], zero, paged);
}

void receiver_corpus() {
  struct Spec {
    const char* name;
    engine::CodecMode mode;
    uint32_t chunk;
    io::Profile profile;
    uint64_t size;
  };
  const Spec specs[] = {
      {"stream-none", engine::CodecMode::none, 4096, io::Profile::binary, 24 << 10},
      {"stream-lz4", engine::CodecMode::lz4, 16384, io::Profile::text, 64 << 10},
      {"stream-zstd", engine::CodecMode::zstd, 16384, io::Profile::binary, 64 << 10},
      {"stream-auto-zero-heavy", engine::CodecMode::auto_select, 16384, io::Profile::zero_heavy, 128 << 10},
      {"stream-auto-binary", engine::CodecMode::auto_select, 8192, io::Profile::binary, 48 << 10},
      {"stream-all-zero", engine::CodecMode::lz4, 65536, io::Profile::zero, 1 << 20},
      {"stream-sparse-zero-heavy", engine::CodecMode::sparse, 16384, io::Profile::zero_heavy, 256 << 10},
      {"stream-sparse-mixed", engine::CodecMode::sparse, 16384, io::Profile::mixed, 96 << 10},
      {"stream-lz4-paged-zero-heavy", engine::CodecMode::lz4, 16384, io::Profile::zero_heavy, 256 << 10},
      {"stream-zstd-paged-zero-heavy", engine::CodecMode::zstd, 16384, io::Profile::zero_heavy, 256 << 10},
  };
  for (const Spec& s : specs) {
    const Bytes stream = capture(s.mode, s.chunk, s.profile, s.size);
    describe(s.name, stream);
    put("receiver", s.name, cat({u8s({0}), stream}));
    // The same stream into a sink that takes pieces (fix-up bit 5).
    if (s.profile == io::Profile::zero_heavy || s.profile == io::Profile::mixed)
      put("receiver", std::string(s.name) + "-pieces", cat({u8s({0x20}), stream}));
  }
  // Variants of one capture: with every fix-up (a valid stream stays valid), cut short, a flipped payload
  // byte, END missing, a chunk dropped, a chunk repeated, and an ABORTED from the sender.
  const Bytes base = capture(engine::CodecMode::lz4, 4096, io::Profile::text, 20 << 10);
  const auto frames = frames_of(base);
  FUZZ_CHECK(frames.size() >= 5, "short capture");
  put("receiver", "fixups-all-valid", cat({u8s({0x1f}), base}));
  put("receiver", "cut-in-chunk", cat({u8s({0}), Bytes(base.begin(), base.begin() + frames[2].first + 60)}));
  Bytes flipped = base;
  flipped[frames[2].first + 48 + 5] ^= std::byte{0x40};
  put("receiver", "flipped-payload", cat({u8s({0}), flipped}));
  put("receiver", "flipped-payload-rehashed", cat({u8s({0x05}), flipped}));
  put("receiver", "no-end", cat({u8s({0}), Bytes(base.begin(), base.begin() + frames.back().first)}));
  Bytes dropped(base.begin(), base.begin() + frames[2].first);
  dropped.insert(dropped.end(), base.begin() + frames[3].first, base.end());
  put("receiver", "chunk-dropped", cat({u8s({0}), dropped}));
  put("receiver", "chunk-dropped-renumbered", cat({u8s({0x1f}), dropped}));
  Bytes repeated(base.begin(), base.begin() + frames[3].first);
  repeated.insert(repeated.end(), base.begin() + frames[2].first, base.end());
  put("receiver", "chunk-repeated", cat({u8s({0}), repeated}));
  const std::string why = "source failed";
  Bytes aborted(base.begin(), base.begin() + frames[2].first);
  aborted = cat({aborted, header_bytes(engine::wire::make_aborted(engine::wire::Reason::source, why.size())),
                 Bytes(reinterpret_cast<const std::byte*>(why.data()),
                       reinterpret_cast<const std::byte*>(why.data()) + why.size())});
  put("receiver", "sender-aborts", cat({u8s({0}), aborted}));
  // A HELLO alone (the receiver then sees the stream end), and a hand-made stream with a zero chunk and
  // transaction ends, repaired by the fix-ups.
  const Hello one{.stream_count = 1, .max_chunk_bytes = 4096, .session_id = 5, .capabilities = 7};
  put("receiver", "hello-only", cat({u8s({0}), hello_frame(one)}));
  // A whole valid transfer whose HELLO claims to resume a session: nothing runs, so it must be refused.
  {
    Bytes resumed = base;
    Hello h;
    engine::wire::decode_hello(std::span<const std::byte, engine::wire::kHelloBytes>(
                                   resumed.data() + engine::wire::kHeaderBytes, engine::wire::kHelloBytes),
                               &h);
    h.flags = engine::wire::kHelloResume;
    const Bytes p = hello_bytes(h);
    std::copy(p.begin(), p.end(), resumed.begin() + engine::wire::kHeaderBytes);
    put("receiver", "regress-resume-hello-without-session", cat({u8s({0}), resumed}));
  }
  const Bytes page = text_chunk(4096);
  const Header d1{.type = FrameType::data,
                  .flags = engine::wire::kFlagEndOfTransaction,
                  .seq = 1,
                  .raw_len = 4096,
                  .payload_len = 4096,
                  .hash = compress::hash64(page.data(), page.size())};
  const Header d2{.type = FrameType::data,
                  .flags = engine::wire::kFlagZero | engine::wire::kFlagEndOfTransaction,
                  .seq = 2,
                  .offset = 4096,
                  .raw_len = 4096};
  put("receiver", "transactions-and-zero",
      cat({u8s({0x1f}), hello_frame(one), header_bytes(d1), page, header_bytes(d2),
           header_bytes(engine::wire::make_end(0, 0, 0))}));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT-DIR\n", argv[0]);
    return 2;
  }
  g_out = argv[1];
  setenv("DSTX_IO", "syscall", 0);
  header_corpus();
  chunk_corpus();
  roundtrip_corpus();
  handshake_corpus();
  receiver_corpus();
  std::printf("corpora written under %s\n", g_out.c_str());
  return 0;
}
