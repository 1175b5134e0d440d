// liburing 2.3 (Debian 12) defines _XOPEN_SOURCE/_GNU_SOURCE in its header. Include the system
// headers first so that the Glibc module and this one agree on fd_set and friends.
// No Swift file imports this module today; the ordering is a safety net for one that does.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/select.h>
#include <signal.h>
#include <time.h>
#include <fcntl.h>
#include <sched.h>
#include <liburing.h>
