// See mapping_guard.h. The handler runs on whichever thread touched the page (an OpenMP worker,
// the writer), so the slot table is lock-free: a slot is claimed with a flag, its range published
// with release stores, and the handler only loads atomics and calls mmap.
#include "mapping_guard.h"

#include <atomic>

#if defined(__linux__)
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#endif

namespace fastmerge {
namespace {

constexpr int kSlots = 4096;  // mappings guarded at once: a merge maps each input shard once

struct Slot {
  std::atomic<bool> used{false};
  std::atomic<std::uintptr_t> begin{0};  // 0: nothing published
  std::atomic<std::uintptr_t> end{0};
  std::atomic<bool> cut{false};
};

Slot g_slots[kSlots];
std::atomic<std::uint64_t> g_cut_pages{0};

#if defined(__linux__)
struct sigaction g_previous;
std::uintptr_t g_page_size = 0;

// The disposition that was there before, for faults that are not ours; with the default one the
// faulting access runs again on return and ends the process as it would have.
void pass_on(int signum, siginfo_t* info, void* context) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    g_previous.sa_sigaction(signum, info, context);
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(signum);
  } else {
    signal(signum, SIG_DFL);
  }
}

void on_sigbus(int signum, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<std::uintptr_t>(info->si_addr);
  if (info->si_code == BUS_ADRERR) {  // a mapped page with no file behind it any more
    for (Slot& slot : g_slots) {
      const std::uintptr_t begin = slot.begin.load(std::memory_order_acquire);
      if (begin == 0 || address < begin || address >= slot.end.load(std::memory_order_acquire)) continue;
      void* page = reinterpret_cast<void*>(address & ~(g_page_size - 1));
      if (mmap(page, g_page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
        slot.cut.store(true, std::memory_order_release);
        g_cut_pages.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      break;
    }
  }
  pass_on(signum, info, context);
}

bool install_handler() {
  static std::once_flag once;
  static bool installed = false;
  std::call_once(once, [] {
    g_page_size = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
    struct sigaction action = {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    installed = sigaction(SIGBUS, &action, &g_previous) == 0;
  });
  return installed;
}
#else
bool install_handler() { return false; }
#endif

}  // namespace

int guard_mapping(std::uintptr_t begin, std::size_t length) {
  if (begin == 0 || length == 0 || !install_handler()) return -1;
  for (int i = 0; i < kSlots; ++i) {
    bool expected = false;
    if (!g_slots[i].used.compare_exchange_strong(expected, true)) continue;
    g_slots[i].cut.store(false, std::memory_order_relaxed);
    g_slots[i].end.store(begin + length, std::memory_order_release);
    g_slots[i].begin.store(begin, std::memory_order_release);
    return i;
  }
  return -1;
}

void unguard_mapping(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  g_slots[slot].begin.store(0, std::memory_order_release);
  g_slots[slot].end.store(0, std::memory_order_release);
  g_slots[slot].used.store(false, std::memory_order_release);
}

bool mapping_cut_short(int slot) {
  return slot >= 0 && slot < kSlots && g_slots[slot].cut.load(std::memory_order_acquire);
}

std::uint64_t cut_short_pages() { return g_cut_pages.load(std::memory_order_relaxed); }

}  // namespace fastmerge
