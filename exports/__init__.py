"""autobits.exports"""
