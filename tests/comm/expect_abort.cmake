# Runs COMMAND (its arguments joined by '|') and passes only if it exits non-zero and its output
# matches the regular expression EXPECT: for jobs that must end through MPI_Abort. The ctest
# timeout catches a job that does not end.
string(REPLACE "|" ";" cmd "${COMMAND}")
execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the job exited with status 0; expected a non-zero status from abort()")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "the output does not match '${EXPECT}'")
endif()
message("the job ended with status ${rc}, as expected")
