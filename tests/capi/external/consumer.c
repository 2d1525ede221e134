/* Links dstx through find_package(dstx) and moves a small state through loopback. */
#include <dstx/dstx.h>

#include <stdio.h>
#include <string.h>

int main(void) {
  if (strcmp(dstx_version(), DSTX_VERSION_STRING) != 0) {
    fprintf(stderr, "header %s, library %s\n", DSTX_VERSION_STRING, dstx_version());
    return 1;
  }
  static unsigned char state[1 << 20], copy[1 << 20];
  for (size_t i = 0; i < sizeof state; ++i) state[i] = (unsigned char)(i * 7 / 4096);

  dstx_recv_config rc = DSTX_RECV_CONFIG_INIT;
  rc.net = DSTX_NET_ADDRESS;
  rc.address = "127.0.0.1:0";
  dstx_endpoint sink = DSTX_ENDPOINT_INIT;
  sink.kind = DSTX_ENDPOINT_BUFFER;
  sink.buffer = copy;
  sink.buffer_bytes = sizeof copy;
  dstx_transfer *recv = NULL, *send = NULL;
  uint16_t port = 0;
  if (dstx_recv_create(&rc, &sink, &recv) != DSTX_OK || dstx_transfer_local_port(recv, &port) != DSTX_OK ||
      dstx_transfer_start(recv) != DSTX_OK) {
    fprintf(stderr, "receiver: %s\n", dstx_last_error(NULL));
    return 1;
  }
  char address[32];
  snprintf(address, sizeof address, "127.0.0.1:%u", (unsigned)port);
  dstx_send_config sc = DSTX_SEND_CONFIG_INIT;
  sc.net = DSTX_NET_ADDRESS;
  sc.address = address;
  sc.streams = 2;
  dstx_endpoint source = DSTX_ENDPOINT_INIT;
  source.kind = DSTX_ENDPOINT_BUFFER;
  source.buffer = state;
  source.buffer_bytes = sizeof state;
  if (dstx_send_create(&sc, &source, &send) != DSTX_OK) {
    fprintf(stderr, "sender: %s\n", dstx_last_error(NULL));
    return 1;
  }
  const int s = dstx_transfer_run(send);
  const int r = dstx_transfer_wait(recv, -1);
  if (s != DSTX_OK || r != DSTX_OK) {
    fprintf(stderr, "send %s: %s\nrecv %s: %s\n", dstx_strerror(s), dstx_last_error(send), dstx_strerror(r),
            dstx_last_error(recv));
    return 1;
  }
  dstx_transfer_destroy(send);
  dstx_transfer_destroy(recv);
  if (memcmp(state, copy, sizeof state) != 0) {
    fprintf(stderr, "the copy differs\n");
    return 1;
  }
  printf("dstx %s: 1 MiB moved and verified\n", dstx_version());
  return 0;
}
