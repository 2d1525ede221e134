// The wire format, pinned: golden vectors (computed independently with Python's struct module and the xxhsum
// command, XXH3 of the first 44 bytes, low 32 bits little-endian), round trips, and every malformed-input
// branch.
#include <gtest/gtest.h>

#include <array>
#include <set>
#include <string>
#include <vector>

#include "compress/codec.h"
#include "engine/wire.h"

namespace dstx::engine::wire {
namespace {

using Bytes = std::array<std::byte, kHeaderBytes>;

std::vector<std::byte> from_hex(const std::string& hex) {
  std::vector<std::byte> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(std::byte(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::string to_hex(std::span<const std::byte> b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (std::byte x : b) {
    s += d[int(x) >> 4];
    s += d[int(x) & 15];
  }
  return s;
}

Bytes encode(const Header& h) {
  Bytes b;
  encode_header(h, b);
  return b;
}

Error decode(const Bytes& b, Header* h, uint32_t max_chunk = 1u << 20) {
  return decode_header(b, max_chunk, h);
}

// Re-seals a header after a deliberate edit so that the checksum does not hide the branch under test.
Bytes reseal(Bytes b) {
  const uint32_t c = uint32_t(compress::hash64(b.data(), 44));
  for (int i = 0; i < 4; ++i) b[44 + i] = std::byte(c >> (8 * i));
  return b;
}

const Header kData{.type = FrameType::data,
                   .codec = 1,
                   .flags = kFlagEndOfTransaction,
                   .seq = 7,
                   .offset = 0x600000,
                   .raw_len = 0x100000,
                   .payload_len = 0x5a5a,
                   .hash = 0x1122334455667788};

TEST(WireGolden, DataHeader) {
  EXPECT_EQ(
      to_hex(encode(kData)),
      "445358460301020007000000000000000000600000000000000010005a5a0000887766554433221100000000f631d938");
}

TEST(WireGolden, ZeroChunkHeader) {
  const Header h{.type = FrameType::data,
                 .codec = 0,
                 .flags = kFlagZero,
                 .seq = 8,
                 .offset = 0x700000,
                 .raw_len = 0x100000};
  EXPECT_EQ(
      to_hex(encode(h)),
      "4453584603000100080000000000000000007000000000000000100000000000000000000000000000000000043c5d72");
}

TEST(WireGolden, ControlFrames) {
  EXPECT_EQ(
      to_hex(encode(make_end(9, 0x880000, 0xdeadbeefcafef00d))),
      "44535846040000000900000000000000000088000000000000000000000000000df0fecaefbeadde000000004d62f7e9");
  EXPECT_EQ(
      to_hex(encode(make_ack(5))),
      "445358460500000005000000000000000000000000000000000000000000000000000000000000000000000075158339");
  EXPECT_EQ(
      to_hex(encode(make_aborted(Reason::checksum, 5))),
      "4453584607000000000000000000000000000000000000000000000005000000000000000000000006000000170c4125");
  EXPECT_EQ(
      to_hex(encode(Header{.type = FrameType::hello, .payload_len = kHelloBytes})),
      "445358460100000000000000000000000000000000000000000000003800000000000000000000000000000093d372d1");
}

TEST(WireGolden, HelloPayload) {
  const Hello h{.version = 1,
                .stream_index = 1,
                .stream_count = 4,
                .max_chunk_bytes = 0x100000,
                .session_id = 0x0123456789abcdef,
                .capabilities = kCapLz4 | kCapZstd,
                .total_bytes = 1ull << 30};
  std::array<std::byte, kHelloBytes> b;
  encode_hello(h, b);
  EXPECT_EQ(to_hex(b),
            "44535458010001000400000000001000efcdab8967452301030000000000000000000040000000000000000000000000"
            "b08017b5df1525cb");
  Hello back;
  ASSERT_EQ(decode_hello(b, &back), Error::ok);
  EXPECT_EQ(back, h);
}

TEST(WireGolden, ResumeHelloAndStreamAck) {
  const Hello h{.version = 1,
                .stream_index = 2,
                .stream_count = 4,
                .flags = kHelloResume,
                .max_chunk_bytes = 0x100000,
                .session_id = 0x0123456789abcdef,
                .capabilities = kCapLz4 | kCapZstd,
                .total_bytes = 1ull << 30,
                .resume_seq = 0x1234};
  std::array<std::byte, kHelloBytes> b;
  encode_hello(h, b);
  EXPECT_EQ(to_hex(b),
            "44535458010002000400010000001000efcdab8967452301030000000000000000000040000000003412000000000000"
            "47203183a689f801");
  Hello back;
  ASSERT_EQ(decode_hello(b, &back), Error::ok);
  EXPECT_EQ(back, h);
  EXPECT_EQ(
      to_hex(encode(make_stream_ack(42))),
      "44535846080000002a000000000000000000000000000000000000000000000000000000000000000000000050992017");
}

TEST(WireGolden, DecodesTheGoldenBytes) {
  const auto raw = from_hex(
      "445358460301020007000000000000000000600000000000000010005a5a0000887766554433221100000000f631d938");
  Bytes b;
  std::copy(raw.begin(), raw.end(), b.begin());
  Header h;
  ASSERT_EQ(decode(b, &h), Error::ok);
  EXPECT_EQ(h, kData);
}

TEST(Wire, RoundTripsEveryFrameType) {
  for (const Header& h :
       {kData, make_end(3, 12345, 42), make_ack(77), make_committed(3, 12345, 42),
        make_aborted(Reason::sink, 100), Header{.type = FrameType::hello, .payload_len = kHelloBytes},
        Header{.type = FrameType::hello_ack, .payload_len = kHelloBytes}}) {
    Header back;
    ASSERT_EQ(decode(encode(h), &back), Error::ok) << int(h.type);
    EXPECT_EQ(back, h);
  }
}

TEST(Wire, EverySingleBitFlipOfAHeaderIsCaught) {
  const Bytes good = encode(kData);
  for (size_t bit = 0; bit < kHeaderBytes * 8; ++bit) {
    Bytes b = good;
    b[bit / 8] ^= std::byte(1u << (bit % 8));
    Header h;
    EXPECT_NE(decode(b, &h), Error::ok) << "bit " << bit;
  }
}

TEST(Wire, BadMagic) {
  Bytes b = encode(kData);
  b[0] = std::byte('X');
  Header h;
  EXPECT_EQ(decode(reseal(b), &h), Error::bad_magic);
}

TEST(Wire, HeaderChecksumMismatch) {
  Bytes b = encode(kData);
  b[8] ^= std::byte(1);  // seq
  Header h;
  EXPECT_EQ(decode(b, &h), Error::bad_header_checksum);
}

TEST(Wire, UnknownType) {
  Bytes b = encode(kData);
  b[4] = std::byte(99);
  Header h;
  EXPECT_EQ(decode(reseal(b), &h), Error::unknown_type);
}

TEST(Wire, UnknownCodec) {
  Header d = kData;
  d.codec = 9;
  Header h;
  EXPECT_EQ(decode(encode(d), &h), Error::bad_codec);
}

TEST(Wire, UnknownFlags) {
  Header d = kData;
  d.flags = 0x80;
  Header h;
  EXPECT_EQ(decode(encode(d), &h), Error::bad_flags);
}

TEST(Wire, OversizeAndImpossibleLengths) {
  Header h;
  Header d = kData;
  d.raw_len = (1u << 20) + 1;  // above the negotiated chunk size
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  d = kData;
  d.raw_len = 0;
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  d = kData;
  d.payload_len = uint32_t(compress::encode_bound(compress::Codec::lz4, d.raw_len) + 1);
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  d = kData;
  d.payload_len = 0;
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  d = kData;
  d.codec = 0;  // raw: payload must equal raw length
  d.payload_len = d.raw_len - 1;
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  EXPECT_EQ(decode(encode(make_aborted(Reason::sink, 0)), &h), Error::ok);
  Header a = make_aborted(Reason::sink, 0);
  a.payload_len = kMaxTextBytes + 1;
  EXPECT_EQ(decode(encode(a), &h), Error::bad_length);
  Header hello{.type = FrameType::hello, .payload_len = kHelloBytes - 1};
  EXPECT_EQ(decode(encode(hello), &h), Error::bad_length);
  Header end = make_end(1, 1, 1);
  end.payload_len = 1;
  EXPECT_EQ(decode(encode(end), &h), Error::bad_length);
}

TEST(Wire, ImpossibleFields) {
  Header h;
  Header d = kData;
  d.seq = 0;  // sequence numbers start at 1
  EXPECT_EQ(decode(encode(d), &h), Error::bad_field);
  Header z{
      .type = FrameType::data, .codec = 0, .flags = kFlagZero, .seq = 1, .raw_len = 4096, .payload_len = 1};
  EXPECT_EQ(decode(encode(z), &h), Error::bad_field);  // a zero chunk carries no payload
  z.payload_len = 0;
  z.codec = 1;
  EXPECT_EQ(decode(encode(z), &h), Error::bad_field);
  Header ack = make_ack(1);
  ack.offset = 5;
  EXPECT_EQ(decode(encode(ack), &h), Error::bad_field);
}

// Paged DATA: lz4 or zstd only, not zero, and aux (the sparse form's length) longer than the bitmap and
// shorter than the chunk; the payload bound is the codec's for that length. Without the flag, aux is 0.
TEST(Wire, PagedFramesAndTheirSparseLength) {
  Header h;
  const Header paged{.type = FrameType::data,
                     .codec = 1,
                     .flags = kFlagPaged,
                     .seq = 1,
                     .raw_len = 1 << 20,
                     .payload_len = 1000,
                     .hash = 5,
                     .aux = 700 << 10};
  EXPECT_EQ(decode(encode(paged), &h), Error::ok);
  EXPECT_EQ(h, paged);
  Header d = paged;
  d.codec = 2;
  EXPECT_EQ(decode(encode(d), &h), Error::ok);
  for (const uint8_t codec : {0, 3}) {
    d = paged;
    d.codec = codec;
    d.payload_len = codec == 0 ? d.raw_len : 1000;
    EXPECT_EQ(decode(encode(d), &h), Error::bad_field) << int(codec);
  }
  d = paged;
  d.flags = kFlagPaged | kFlagZero;
  d.codec = 0;
  d.payload_len = 0;
  d.hash = 0;
  EXPECT_EQ(decode(encode(d), &h), Error::bad_field);
  for (const uint32_t aux : {0u, 32u, 1u << 20, (1u << 20) + 1}) {  // the bitmap alone, the whole chunk
    d = paged;
    d.aux = aux;
    EXPECT_EQ(decode(encode(d), &h), Error::bad_field) << aux;
  }
  d = paged;
  d.aux = 33;  // 1000 bytes of payload cannot decode to 33
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  d.payload_len = 20;
  EXPECT_EQ(decode(encode(d), &h), Error::ok);
  d.payload_len = uint32_t(compress::encode_bound(compress::Codec::lz4, 33) + 1);
  EXPECT_EQ(decode(encode(d), &h), Error::bad_length);
  d = kData;
  d.aux = 1;  // not paged: aux must be 0
  EXPECT_EQ(decode(encode(d), &h), Error::bad_field);
}

// What a peer's ABORTED says is reported as it is, but a reason this version does not know, or none, is a
// protocol failure (never "unknown", never the C ABI's "a bug in dstx").
TEST(Wire, APeersReasonIsKnownOrProtocol) {
  EXPECT_EQ(reason_from_peer(uint32_t(Reason::timeout)), Reason::timeout);
  EXPECT_EQ(reason_from_peer(uint32_t(Reason::capability)), Reason::capability);
  EXPECT_EQ(reason_from_peer(uint32_t(Reason::version)), Reason::version);
  EXPECT_EQ(reason_from_peer(0), Reason::protocol);
  EXPECT_EQ(reason_from_peer(uint32_t(Reason::capability) + 1), Reason::protocol);
  EXPECT_EQ(reason_from_peer(0xffffffffu), Reason::protocol);
}

TEST(Wire, HelloRejectsBadMagicAndAnyChangedByte) {
  std::array<std::byte, kHelloBytes> b;
  encode_hello(Hello{.max_chunk_bytes = 4096, .session_id = 1}, b);
  Hello out;
  auto bad = b;
  bad[0] = std::byte(0);
  EXPECT_EQ(decode_hello(bad, &out), Error::bad_magic);
  for (size_t i = 4; i < kHelloBytes; ++i) {  // every byte is covered by the HELLO checksum
    bad = b;
    bad[i] ^= std::byte(0x10);
    EXPECT_EQ(decode_hello(bad, &out), Error::bad_header_checksum) << "byte " << i;
  }
}

TEST(Wire, StreamDigestDependsOnOrderAndContent) {
  StreamDigest a, b, c;
  a.add(1, 10, 100);
  a.add(2, 10, 200);
  b.add(2, 10, 200);
  b.add(1, 10, 100);
  c.add(1, 10, 100);
  c.add(2, 10, 201);
  EXPECT_NE(a.value(), b.value());
  EXPECT_NE(a.value(), c.value());
  StreamDigest a2;
  a2.add(1, 10, 100);
  a2.add(2, 10, 200);
  EXPECT_EQ(a.value(), a2.value());
}

TEST(Wire, ReasonNamesAreDistinct) {
  std::set<std::string> names;
  for (uint32_t r = 0; r <= uint32_t(Reason::capability); ++r) names.insert(reason_name(Reason(r)));
  EXPECT_EQ(names.size(), size_t(Reason::capability) + 1);
}

}  // namespace
}  // namespace dstx::engine::wire
