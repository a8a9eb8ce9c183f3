// CPU threads per rank. oneDNN and our loops share one OpenMP pool.
#pragma once

namespace meshtrain::cpu {

// Sets the OpenMP thread count used by every CPU op on this process.
void set_num_threads(int n);
int num_threads();
// The default for a process that is one of local_ranks ranks on this node: MESHTRAIN_THREADS
// when set, otherwise the available cores divided evenly (at least 1).
int default_num_threads(int local_ranks);

}  // namespace meshtrain::cpu
