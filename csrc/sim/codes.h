// The simulator core's interface codes and error tags, shared by the driver (driver.cpp), the
// predictions (predict.h) and the Python bindings (bindings.h); moecache/sim/engine_cpp.py and the
// policies' and predictors' cpp_port methods speak the same numbers.
#pragma once

#include <cstdint>

namespace moecache_sim {

// PolicyCode: policies/*.py ``cpp_port().code``.
enum PolicyCode : int64_t {
  P_LRU = 0, P_FIFO = 1, P_LFU = 2, P_LRFU = 3, P_STATIC = 4, P_BELADY = 5, P_BYPASS = 6, P_ACTIVATION = 7,
  P_PREDICTED = 8
};
// PredictorCode: predictors/*.py ``cpp_port()["predictor"]``; PR_STREAM: predictions streamed from Python.
enum PredictorCode : int64_t { PR_NONE = -1, PR_STREAM = 0, PR_PRIOR = 1, PR_TEMPORAL = 2, PR_TRANSITION = 3 };
enum PrefetchCode : int64_t { PF_TOPK = 0, PF_FILL = 1 };
// moecache/admission.py ADMISSION_CODES
enum AdmissionCode : int64_t { AD_NONE = 0, AD_COST = 1, AD_GATED = 2 };
enum MissCode : int64_t { M_COPY = 0, M_CPU = 1, M_POLICY = 2, M_MIN = 3 };
enum Outcome : int64_t { O_HIT = 0, O_COPY = 1, O_CPU = 2 };

// A ConfigError on the Python side: engine_cpp.py re-raises RuntimeErrors starting with this tag.
const char* const CONFIG_TAG = "ConfigError: ";
// The Python predictor behind a prediction stream raised; engine_cpp.py re-raises its exception.
const char* const STREAM_TAG = "PredictionStreamError: ";
// The cost tables are too short for a token count: engine_cpp.py retries with longer ones.
const char* const TABLE_TAG = "TableTooShort: ";

}  // namespace moecache_sim
