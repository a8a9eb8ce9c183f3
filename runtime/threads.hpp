// CPU threads of this process: the one OpenMP pool that oneDNN and every CPU op share. Public so
// that whatever starts a job (launch/, an embedding program, a benchmark) sizes it without
// reaching into the CPU backend, which implements it (runtime/cpu/threads.cpp).
#pragma once

namespace meshtrain {

// Sets the thread count every CPU op of this process uses. Throws InvalidArgument below 1.
void set_cpu_threads(int n);
int cpu_threads();
// The default for a process that is one of local_ranks ranks on this node: MESHTRAIN_THREADS
// when set, otherwise the available cores divided evenly (at least 1).
int default_cpu_threads(int local_ranks);

}  // namespace meshtrain
